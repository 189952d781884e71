"""``python -m guarded_diffusers.cli``: the fluxguard command."""

from .main import main

raise SystemExit(main())
