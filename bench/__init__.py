"""The benchmark suite behind `editrt bench`."""
