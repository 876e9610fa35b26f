"""PyTorch model definitions and weight loading (plain PyTorch; speed-ups are applied by builders)."""
