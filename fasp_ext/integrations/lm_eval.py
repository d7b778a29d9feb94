"""lm-eval's harness on a model you hold (for example one rebuilt by ``fasp_ext.load_pruned``).

``fasp-ext eval --model pruned/ --tasks paper`` runs the seven zero-shot tasks of the FASP paper
(BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy, ARC-challenge, OpenBookQA) by name; those download
their data from the Hugging Face hub. Offline, give a task YAML file (``--tasks my_task.yaml``) or a
folder of them (``--include-path``): a task over a local JSON/JSONL file needs no network
(``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: /path/file.jsonl}}``).

Install with ``pip install fasp_ext[lm-eval]`` (lm-eval 0.4.x). ``lm_eval`` is imported only when
:func:`evaluate` runs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PAPER_TASKS", "resolve_tasks", "require", "evaluate", "summary"]

#: the FASP paper's zero-shot tasks (lm-eval names), as in Wanda/FLAP/SliceGPT evaluations
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

_HINT = "fasp-ext eval --tasks needs lm-eval: pip install 'fasp_ext[lm-eval]' (or pip install lm-eval==0.4.13)"


def resolve_tasks(specs, include_path: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """``(task names, include paths)`` for specs that are task names, ``paper`` (:data:`PAPER_TASKS`),
    or task YAML files (their folder is included, their ``task:`` name used)."""
    names: list[str] = []
    paths: list[str] = [str(include_path)] if include_path else []
    for spec in specs:
        spec = str(spec)
        if spec == "paper":
            names.extend(PAPER_TASKS)
        elif spec.endswith((".yaml", ".yml")):
            p = Path(spec).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"--tasks: task file {spec!r} does not exist")
            import yaml

            doc = yaml.safe_load(p.read_text()) or {}
            name = doc.get("task") if isinstance(doc, dict) else None
            if not isinstance(name, str):
                raise ValueError(f"--tasks: {spec} has no 'task:' name")
            names.append(name)
            if str(p.parent.resolve()) not in paths:
                paths.append(str(p.parent.resolve()))
        else:
            names.extend(t for t in spec.split(",") if t)
    if not names:
        raise ValueError("--tasks: no task given")
    return names, paths


def require() -> None:
    """Raise a clear error (with the install command) when lm-eval is not installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise RuntimeError(_HINT)


def evaluate(model, tokenizer, tasks, *, include_path=None, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int = 8, log_samples: bool = False) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``model`` (a loaded causal LM, on its device) and return
    lm-eval's results dict (``results[task][metric]``; ``samples`` too with ``log_samples``)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError(f"{_HINT} ({e})") from None
    names, paths = resolve_tasks(tasks if isinstance(tasks, (list, tuple)) else [tasks], include_path)
    tm = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown lm-eval task(s) {unknown} (task YAML files and --include-path add "
                         f"local ones)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=log_samples, bootstrap_iters=0)
    if res is None:  # non-zero ranks in a distributed run
        return {}
    return res


def summary(res: dict) -> dict:
    """``{task: {metric: value}}`` with lm-eval's ``metric,filter`` keys shortened to ``metric``
    (standard errors and aliases dropped)."""
    out = {}
    for task, metrics in (res.get("results") or {}).items():
        row = {}
        for key, v in metrics.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(v, (int, float)):
                continue
            row[key.split(",")[0]] = float(v)
        out[task] = row
    return out
