"""The evaluation suite as a script: `python benchmarks/evaluate.py --pipeline DIR --dataset DIR ...`.

Same command as `python -m diffusers_diffae.evaluation` (see `src/diffusers_diffae/evaluation/suite.py`); the
outputs (JSON, Markdown, plots) go to `docs/results/` by default.
"""

from diffusers_diffae.evaluation.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
