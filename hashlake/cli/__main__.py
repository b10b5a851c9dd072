"""``python -m hashlake.cli``: the ``hashlake`` command."""
from hashlake.cli import app

if __name__ == "__main__":
    app()
