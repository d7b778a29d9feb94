"""Adapters to other toolkits; each module imports its toolkit only when imported itself.

* :mod:`fasp_ext.integrations.llmcompressor`: ``FASPModifier`` for llm-compressor's ``oneshot``
  (``pip install llmcompressor``).
* :mod:`fasp_ext.integrations.lm_eval`: lm-eval's harness on a loaded (pruned) model
  (``pip install fasp_ext[lm-eval]``); used by ``fasp-ext eval --tasks``.
"""
