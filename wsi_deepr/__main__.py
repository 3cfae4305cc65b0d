"""``python -m wsi_deepr`` runs the command-line interface."""

from wsi_deepr.cli import main

main()
