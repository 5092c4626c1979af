"""Bridges from eah-interp to the tools people run their benchmarks with.

* `eah_interp.integrations.lmms_eval`: an lmms-eval model (``--model eah``) that runs any lmms-eval task
  with any intervention spec switched on (``pip install "eah-interp[lmms]"``; docs/howto/lmms_eval.md).
"""
