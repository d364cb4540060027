"""`python -m mnv1_backbone`: the `mnv1` command line (see `mnv1_backbone.cli`)."""

from mnv1_backbone.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
