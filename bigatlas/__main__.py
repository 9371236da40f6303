"""`python -m bigatlas COMMAND …`: the `bigatlas` command, also under `accelerate launch -m bigatlas embed …`
or `torchrun -m bigatlas train …` from an installed package (no checkout needed)."""

from .cli import main

raise SystemExit(main())
