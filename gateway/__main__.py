"""`python -m gateway` is the same as the `dicom-mail-gateway` console script."""

from gateway.cli import main

if __name__ == "__main__":  # worker processes (forkserver) import this module again: they must not run main()
    raise SystemExit(main())
