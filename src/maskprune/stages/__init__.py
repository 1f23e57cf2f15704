"""The stages of a run, below the recipes (:mod:`maskprune.recipes`) and above the components: set up the run
context (:mod:`.context`), choose the units (:mod:`.learned` or :mod:`.oneshot`, both giving an
:class:`~.outcome.Outcome`), cut and export (:mod:`.export`), all of them in order in :func:`.run.run_stage`.
A stage never imports a recipe."""
