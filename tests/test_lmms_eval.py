"""lmms-eval end to end (train/lmms/): a tiny model trained on the synthetic task and exported with its
eval files, evaluated on local POPE-, GQA- and multiple-choice-format tasks through the real CLI and
through run_lmms_tasks, dense and under FastV, and checked against our own evaluation of the same
documents: training's prompt encoder and image preprocessing, models.generation.greedy_generate for
answers and a full forward for choice log-likelihoods. Offline: nothing is downloaded."""

import importlib.util
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.chat import ChatTokenizer
from models.families.llava import PadToSquare
from data.datamodule import ImageSpec, MLLMDataModule, SampleEncoder
from data.synthetic import SyntheticConfig, ensure_generated
from data.tokenizer import load_pretrained_tokenizer
from models import MLLM
from models.generation import greedy_generate
from train.lmms.export import write_eval_files
from train.lmms.plans import plan_for_checkpoint
from train.lmms.tasks.synthetic import write_synthetic_tasks

from tests.lmms_helpers import task_model_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed (python3 train/bootstrap.py --eval)"),
]
ROOT = Path(__file__).resolve().parents[1]
TASKS = ["synthetic_pope", "synthetic_gqa", "synthetic_mc"]
N_DOCS = 12
MAX_NEW_TOKENS = 16  # the tasks' generation_kwargs


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, task_tokenizer):
    """100 steps on one-question conversations (enough for answers that depend on the question), then
    save_pretrained + the tokenizer + write_eval_files, as the training job's export step does."""
    root = tmp_path_factory.mktemp("lmms_export")
    shards = root / "shards"
    ensure_generated(shards, SyntheticConfig(seed=0, n_train=320, n_val=16, turns_per_image=1, describe=False, samples_per_shard=160), progress=False)
    config = task_model_config()
    chat = ChatTokenizer(task_tokenizer, "vicuna", config.num_image_tokens, 512, system="")
    dm = MLLMDataModule(sorted(str(p) for p in shards.glob("train-*.tar")), sorted(str(p) for p in shards.glob("val-*.tar")),
                        SampleEncoder(chat, ImageSpec(PadToSquare(64, config.image_mean, config.image_std))), pad_id=0, batch_size=16,
                        eval_batch_size=8, num_workers=0, shuffle_buffer=50)
    dm.setup("fit")
    torch.manual_seed(0)
    model = MLLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    batches = iter(dm.train_dataloader())
    for _ in range(100):
        b = next(batches)
        loss = model(b.input_ids, b.attention_mask, b.pixel_values, labels=b.labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    export = root / "export"
    model.save_pretrained(export)
    task_tokenizer.save_pretrained(export)
    write_eval_files(export, "vicuna", system_prompt="")
    return export


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_synthetic_tasks(tmp_path_factory.mktemp("lmms_tasks"), N_DOCS)


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    """In-process runs cache the json datasets under a temporary directory, not ~/.cache."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))
        yield


def load_model(export: Path, arch: str) -> MLLM:
    model = MLLM.from_pretrained(export).eval()
    model.set_plan(plan_for_checkpoint(arch, model.config))
    return model


def docs(tasks_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (tasks_dir / f"{task}.jsonl").read_text().splitlines()]


def exact(text: str) -> str:
    """lmms-eval's exact_match with ignore_case and ignore_punctuation."""
    return text.strip().lower().translate(str.maketrans("", "", string.punctuation))


@torch.no_grad()
def own_evaluation(export: Path, arch: str, tasks_dir: Path) -> dict:
    """Answers and scores computed without train/lmms: training's ChatTokenizer prompts, training's
    image preprocessing, greedy_generate one document at a time, full-forward choice likelihoods."""
    model = load_model(export, arch)
    tok = load_pretrained_tokenizer(export)
    chat = ChatTokenizer(tok, "vicuna", model.config.num_image_tokens, 512, system="")

    def encode(doc, reply):
        return chat.encode([{"from": "human", "value": f"<image>\n{doc['question']}"}, {"from": "gpt", "value": reply}])

    def pixels(doc):
        return PadToSquare(64, model.config.image_mean, model.config.image_std)(Image.open(doc["image"]).convert("RGB")).pixels[None]

    def answer(doc):
        enc = encode(doc, doc["answer"])
        ids = torch.tensor([enc.input_ids[: enc.prompt_len]])
        new = greedy_generate(model, ids, torch.ones_like(ids), pixels(doc), MAX_NEW_TOKENS, tok.eos_token_id, tok.pad_token_id)[0].tolist()
        return tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new, skip_special_tokens=True).strip()

    def choice_logprob(doc, choice):
        enc = encode(doc, choice)
        prompt, continuation = enc.input_ids[: enc.prompt_len], enc.input_ids[enc.prompt_len : -1]  # the reply without </s>
        ids = torch.tensor([prompt + continuation])
        logits = model(ids, torch.ones_like(ids), pixels(doc), logits="all", query_pos=torch.tensor([len(prompt) - 1])).logits
        logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), -1)
        return float(logp.gather(1, torch.tensor(continuation)[:, None]).sum())

    out = {"answers": {}}
    gqa = docs(tasks_dir, "synthetic_gqa")
    out["answers"]["synthetic_gqa"] = [answer(d) for d in gqa]
    out["bench/synthetic_gqa/exact_match"] = sum(exact(p) == exact(d["answer"]) for p, d in zip(out["answers"]["synthetic_gqa"], gqa)) / len(gqa)
    pope = docs(tasks_dir, "synthetic_pope")
    preds = [answer(d).lower() for d in pope]
    out["answers"]["synthetic_pope"] = preds
    gold = [d["answer"] for d in pope]
    tp = sum(p == g == "yes" for p, g in zip(preds, gold))
    precision = tp / max(1, sum(p == "yes" for p in preds))
    recall = tp / max(1, gold.count("yes"))
    out["bench/synthetic_pope/pope_accuracy"] = sum(p == g for p, g in zip(preds, gold)) / len(gold)
    out["bench/synthetic_pope/pope_f1_score"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mc = docs(tasks_dir, "synthetic_mc")
    scores = [[choice_logprob(d, c) for c in d["choices"]] for d in mc]
    out["answers"]["synthetic_mc"] = scores
    out["bench/synthetic_mc/acc"] = sum(d["choices"][max(range(len(s)), key=s.__getitem__)] == d["answer"] for d, s in zip(mc, scores)) / len(mc)
    return out


_OWN: dict = {}


def own(export: Path, arch: str, tasks_dir: Path) -> dict:
    if arch not in _OWN:
        _OWN[arch] = own_evaluation(export, arch, tasks_dir)
    return _OWN[arch]


def assert_scores_match(scores: dict, expected: dict) -> None:
    for key, value in expected.items():
        if key.startswith("bench/"):
            assert scores[key] == pytest.approx(value, abs=1e-9), (key, scores[key], value)


# --- the CLI --------------------------------------------------------------------------------------
def run_cli(export: Path, arch: str, tasks_dir: Path, out: Path, batch_size: int) -> tuple[dict, dict]:
    """`python -m lmms_eval --model efficient_mllm ...`; returns (results, per-task samples)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf_home")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "efficient_mllm",
           "--model_args", f"pretrained={export},arch={arch},dtype=float32,device=cpu,batch_size={batch_size}",
           "--tasks", ",".join(TASKS), "--include_path", str(tasks_dir), "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert "Model 'efficient_mllm' not found" not in proc.stdout + proc.stderr, (
        "efficient_mllm is not registered with lmms-eval: reinstall the project (pip install -e .) to record its "
        "lmms_eval.models entry point"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    samples = {t: sorted((json.loads(line) for f in out.rglob(f"*_samples_{t}.jsonl") for line in f.read_text().splitlines()),
                         key=lambda s: s["doc_id"]) for t in TASKS}
    return json.loads(results_file.read_text())["results"], samples


def first(response):
    """A logged generation response: the string, or the first of a list of them."""
    return response[0] if isinstance(response, list) else response


@pytest.mark.parametrize("arch", ["dense", "fastv"])
def test_cli_scores_equal_our_own_evaluation(export_dir, tasks_dir, tmp_path, arch):
    from train.lmms.run import flatten_results

    results, samples = run_cli(export_dir, arch, tasks_dir, tmp_path, batch_size=4)
    expected = own(export_dir, arch, tasks_dir)
    for task in ("synthetic_gqa", "synthetic_pope"):  # the same answer for every document
        assert [first(s["filtered_resps"]).strip().lower() for s in samples[task]] == [a.lower() for a in expected["answers"][task]]
    assert len({a for a in expected["answers"]["synthetic_gqa"]}) > 1  # the model does not answer everything alike
    for sample, own_scores in zip(samples["synthetic_mc"], expected["answers"]["synthetic_mc"]):  # the choices' NLLs
        nlls = [float(pair[0]) for pair in sample["filtered_resps"]]  # logged as strings
        assert nlls == pytest.approx([-s for s in own_scores], abs=1e-3)
    assert_scores_match(flatten_results(results), expected)
    if arch != "dense":  # the plan really ran: its likelihoods are not dense's
        dense = own(export_dir, "dense", tasks_dir)["answers"]["synthetic_mc"]
        assert max(abs(a - b) for x, y in zip(expected["answers"]["synthetic_mc"], dense) for a, b in zip(x, y)) > 1e-3


# --- in process -----------------------------------------------------------------------------------
def test_run_lmms_tasks_scores_do_not_depend_on_the_batch_size(export_dir, tasks_dir, datasets_cache):
    from train.lmms.processor import EvalProcessor
    from train.lmms.run import run_lmms_tasks

    model = load_model(export_dir, "fastv")
    processor = EvalProcessor.from_pretrained(export_dir, model.config)
    one = run_lmms_tasks(model, processor, TASKS, include_path=tasks_dir, batch_size=1)
    five = run_lmms_tasks(model, processor, TASKS, include_path=tasks_dir, batch_size=5)
    assert set(one) >= {"bench/synthetic_gqa/exact_match", "bench/synthetic_pope/pope_f1_score", "bench/synthetic_mc/acc"}
    assert one == five
    assert_scores_match(one, own(export_dir, "fastv", tasks_dir))
    limited = run_lmms_tasks(model, processor, ["synthetic_gqa"], include_path=tasks_dir, batch_size=5, limit=4)
    gqa = docs(tasks_dir, "synthetic_gqa")[:4]
    answers = own(export_dir, "fastv", tasks_dir)["answers"]["synthetic_gqa"][:4]
    assert limited == {"bench/synthetic_gqa/exact_match": sum(exact(a) == exact(d["answer"]) for a, d in zip(answers, gqa)) / 4}


# --- through the training job's evaluation ---------------------------------------------------------
def test_train_evaluate_writes_benchmark_scores_into_metrics_json(export_dir, tasks_dir, tmp_path):
    """`python -m train evaluate ... eval.lmms_tasks=[...]`: the benchmark scores of the checkpoint
    under the plan land in metrics.json as bench/<task>/<metric>, equal to our own evaluation."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "train", "evaluate", f"paths.root_dir={tmp_path}", f"model.pretrained={export_dir}",
           "arch=fastv", "data.source.n_train=48", "data.source.n_val=24", "data.num_workers=0",
           f"eval.lmms_tasks=[{','.join(TASKS)}]", f"eval.lmms_include_path={tasks_dir}", "eval.lmms_batch_size=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (metrics_file,) = (tmp_path / "outputs" / "eval").glob("*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())["metrics"]
    assert "val/acc" in metrics and "eff/flops_ratio" in metrics
    assert_scores_match(metrics, own(export_dir, "fastv", tasks_dir))
