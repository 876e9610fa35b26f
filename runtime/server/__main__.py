"""`python -m editrt.runtime.server ...` = `editrt serve ...`."""
import sys

from editrt.runtime.server.cli import main

sys.exit(main())
