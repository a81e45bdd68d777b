"""One module per golden-case component kind; each exposes `run(case) -> Outputs`."""
