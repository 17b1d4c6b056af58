"""`python -m gateway` is the same as the `dicom-mail-gateway` console script."""

from gateway.cli import main

raise SystemExit(main())
