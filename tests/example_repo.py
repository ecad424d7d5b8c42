"""Regenerate `examples/model-repo/models/*` by merging for real: `python -m tests.example_repo`.

The example is a model repository as `hubmerge card --all` and the CI action expect it (see
`hubmerge/card/folders.py`): each model's `config.yaml`, which this script reads and never
writes, then what `hubmerge merge` writes except the files the example's `.gitignore` keeps out
(weights, tokenizer vocabulary), its lm-eval results, and the card rendered from all of them.

The donors the configs name (`donors/...`, relative to where the merge runs) are tiny random
Llamas with a character tokenizer, made here, so no network is needed. The results come from a
real lm-eval run on an eight-question toy task; the parts of lm-eval's file that describe this
machine or repeat the task's config are dropped, since the card reads neither.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "model-repo"
#: The donors the example configs name, and their seeds.
DONORS = {"tiny-llama-a": 0, "tiny-llama-b": 1}
#: The toy task each evaluated model runs: "a+b=" with three sums to choose from.
TASK = "tiny_add"
EVALUATED = ("tiny-frankenmerge",)
#: lm-eval results keys that are card inputs (see hubmerge/card/results.py) or say what ran.
RESULTS_KEYS = ("results", "versions", "n-shot", "higher_is_better", "n-samples", "config")
RESULTS_KEYS += ("date", "lm_eval_version", "transformers_version")


def ignored(name: str, example: Path = EXAMPLE) -> bool:
    """Whether the example's `.gitignore` keeps a merge output of this name out of git."""
    lines = (example / ".gitignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def make_donors(root: Path) -> None:
    """The tiny Llamas the configs name, under `root/donors/`, each with a tokenizer and card."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tinymodels import make_model

    # One token per printable character, within the tiny models' 96-entry vocabulary.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {chr(c): 3 + i for i, c in enumerate(range(32, 32 + 93))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    for name, seed in DONORS.items():
        path = make_model("llama", root / "donors" / name, seed=seed)
        fast.save_pretrained(path)
        (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A tiny random Llama\n")


def write_task(root: Path) -> Path:
    """The toy lm-eval task, in a folder for `include_path`."""
    folder = root / "tasks"
    folder.mkdir()
    pairs = [(1, 2), (3, 4), (2, 2), (5, 1), (0, 7), (4, 4), (6, 2), (3, 3)]
    docs = [
        {"question": f"{a}+{b}=", "choices": [str(a + b + k) for k in range(3)]} for a, b in pairs
    ]
    (folder / f"{TASK}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {folder / TASK}.jsonl}}}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: 0\n'
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
        "metadata: {version: 1.0}\n"
    )
    return folder


def regenerate(example: Path = EXAMPLE) -> list[Path]:
    """Merge every model of `example` again and replace its committed outputs; the folders."""
    from hubmerge.card.folders import MODEL_CONFIG, refresh
    from hubmerge.config import load_config
    from hubmerge.evals import run_eval
    from hubmerge.folder import RESULTS_DIR
    from hubmerge.merge import merge

    # By config, not by plan: a new model has no outputs yet.
    folders = sorted(p.parent for p in (example / "models").glob(f"*/{MODEL_CONFIG}"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_donors(root)
        tasks = write_task(root)
        cwd = Path.cwd()
        os.chdir(root)  # the configs name their donors relative to where the merge runs
        try:
            for folder in folders:
                out = merge(load_config(folder / MODEL_CONFIG), root / "out" / folder.name)
                assert out.out_dir is not None
                for old in folder.iterdir():  # all but the user's inputs: no leftovers
                    if old.name not in (MODEL_CONFIG, RESULTS_DIR):
                        old.unlink()
                for file in out.out_dir.iterdir():
                    if not ignored(file.name, example):
                        shutil.copy2(file, folder / file.name)
                if folder.name in EVALUATED:
                    results = folder / RESULTS_DIR / f"{TASK}.json"
                    run_eval(out.out_dir, [TASK], output=results, include_path=[tasks])
                    data = json.loads(results.read_text())
                    kept = {key: data[key] for key in RESULTS_KEYS if key in data}
                    kept["config"]["model"] = folder.name  # not this machine's path to it
                    results.write_text(json.dumps(kept, indent=2) + "\n")
                refresh(folder)
        finally:
            os.chdir(cwd)
    return folders


if __name__ == "__main__":
    for folder in regenerate():
        print(f"regenerated {folder}")
