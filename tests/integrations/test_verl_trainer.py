"""The ``cepo`` trainer mode's advantage step on real TransferQueue (local Ray), with a stand-in
actor worker group that computes log-probs in process on a tiny Qwen3 built from a config.

verl's own ``_compute_advantage`` runs first (``adv_estimator=cepo``), then the CEPO step. The
expected Â is rebuilt independently: A from the written-out GRPO formula, teacher log-probs from
a plain forward of prompt + " answer" + response, and the clipped-weight formula.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]', own venv)")
pytest.importorskip("transfer_queue", reason="TransferQueue is not installed (extra verl)")

from tests.integrations.test_verl_plugin import compose  # noqa: E402
from tests.integrations.verl_helpers import (  # noqa: E402
    CHARS,
    GROUPS,
    CharTokenizer,
    expected_a_hat,
    expected_grpo,
    verl_rows,
)

TOK = CharTokenizer()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tq():
    """TransferQueue under a local Ray: one controller and one storage unit (a CPU each)."""
    import ray
    import transfer_queue
    from omegaconf import OmegaConf

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        transfer_queue.init(OmegaConf.create(
            {"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
        yield transfer_queue
        transfer_queue.close()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)
    assert len(CHARS) + 1 <= config.vocab_size
    return Qwen3ForCausalLM(config).eval()


@torch.no_grad()
def sequence_logprobs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[L]: position p holds log P(ids[p + 1] | ids[:p + 1]) (verl's layout), last one 0."""
    logits = model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None]).logits[0]
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = torch.zeros(len(ids))
    out[:-1] = lp[:-1].gather(-1, ids[1:, None])[:, 0]
    return out


class StandInActor:
    """``actor_rollout_wg``: compute_log_prob(KVBatchMeta) reads the rows from TransferQueue,
    scores them in process and writes ``log_probs`` back, as verl's actor workers do. With an
    ``engine`` (verl's own, `verl_engine.cpu_engine`) the rows go through its ``infer_batch``
    with every field the worker would fetch; without, through a plain forward."""

    def __init__(self, model, tq, engine=None, micro_batch_size: int = 1):
        self.model, self.tq, self.engine, self.calls = model, tq, engine, []
        self.micro_batch_size = micro_batch_size

    def compute_log_prob(self, meta):
        from tensordict import TensorDict
        from verl.utils import tensordict_utils as tu

        data = self.tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id)
        ids = list(data["input_ids"].unbind())
        self.calls.append({"keys": list(meta.keys), "extra_info": dict(meta.extra_info),
                           "input_ids": ids, "position_ids": list(data["position_ids"].unbind()),
                           "multi_modal_inputs": list(data["multi_modal_inputs"])
                           if "multi_modal_inputs" in data.keys() else None})
        if self.engine is not None:
            from tests.integrations.verl_engine import WORKER_DEFAULTS

            extra = {k: v for k, v in meta.extra_info.items() if k != "no_lora_adapter"}
            tu.assign_non_tensor(data, **extra, **{
                **WORKER_DEFAULTS, "micro_batch_size_per_gpu": self.micro_batch_size})
            out = list(self.engine.infer_batch(data)["model_output"]["log_probs"].unbind())
        else:
            temperature = meta.extra_info.get("temperature", 1.0)
            out = [sequence_logprobs(self.model, row, temperature) for row in ids]
        self.tq.kv_batch_put(keys=meta.keys, partition_id=meta.partition_id, fields=TensorDict(
            {"log_probs": torch.nested.as_nested_tensor(out, layout=torch.jagged)},
            batch_size=len(out)))
        return meta


def put_batch(tq, model, vision: bool = False):
    """The batch verl hands the advantage step: rollouts, scores and old log-probs; with
    ``vision``, verl's Qwen-VL layout: a text row above three M-RoPE rows, and per-row images."""
    from tensordict import TensorDict
    from transfer_queue import KVBatchMeta
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    rows = verl_rows(TOK)
    keys = [r.pop("key") for r in rows]
    for n, r in enumerate(rows):
        r["old_log_probs"] = sequence_logprobs(model, r["input_ids"])[
            len(r["prompts"]) - 1: len(r["input_ids"]) - 1]
        if vision:  # positions as if the prompt's first 3 tokens were an image (shifted rows)
            length = len(r["input_ids"])
            r["position_ids"] = torch.stack([torch.arange(length)] + [
                torch.arange(length) + 7 * k for k in range(3)])
            r["multi_modal_inputs"] = {"pixel_values": torch.full((4, 6), float(n)),
                                       "image_grid_thw": torch.tensor([[1, 2, 2]])}
    tags = [{"status": "success", "seq_len": len(r["input_ids"])} for r in rows]
    tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows),
                    tags=tags)
    assert isinstance(tq.kv_batch_get(keys=keys[:1], partition_id="train",
                                      select_fields=["prompts"]), TensorDict)
    return KVBatchMeta(keys=keys, tags=tags, partition_id="train"), rows


def test_vision_rows_keep_images_and_positions(tq, model):
    """Teacher rows of an image prompt carry its images and continue its positions."""
    batch, rows = put_batch(tq, model, vision=True)
    try:
        trainer = make_trainer(model, tq, 1)
        trainer._compute_advantage(batch, {})
        (call,) = trainer.actor_rollout_wg.calls
        plan_rows = trainer.cepo_last_plan.rows
        assert len(call["position_ids"]) == len(plan_rows)
        for row, ids, pos, mm in zip(plan_rows, call["input_ids"], call["position_ids"],
                                     call["multi_modal_inputs"]):
            src = rows[row.source]
            p = len(src["prompts"])
            assert pos.shape == (4, len(ids))
            assert torch.equal(pos[:, :p], src["position_ids"][:, :p])  # the image's positions
            start = src["position_ids"][:, p:p + 1]
            assert torch.equal(pos[:, p:], start + torch.arange(len(ids) - p))
            assert torch.equal(mm["pixel_values"], src["multi_modal_inputs"]["pixel_values"])
    finally:
        tq.kv_clear(keys=batch.keys, partition_id="train")


def make_trainer(model, tq, global_steps: int, *overrides: str, engine=None):
    from cepo.integrations.verl.trainer import CEPOTrainer, check_config

    trainer = CEPOTrainer.__new__(CEPOTrainer)  # no Ray workers: only the advantage step runs
    trainer.config = compose(*overrides)
    trainer.cepo_options = check_config(trainer.config)
    trainer.global_steps = global_steps
    trainer.tokenizer, trainer.processor = TOK, None
    micro = trainer.config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu or 1
    trainer.actor_rollout_wg = StandInActor(model, tq, engine, micro)
    return trainer


@pytest.fixture(scope="module")
def engine(model):
    """verl's FSDP language-model engine around the tiny model, on the CPU."""
    from tests.integrations.verl_engine import cpu_engine, cpu_verl

    with cpu_verl():
        yield cpu_engine(model)


def teacher_logprobs(model, row: dict, answer: str) -> torch.Tensor:
    """[T] log-probs of the response after prompt + " answer", from a plain forward."""
    ids = torch.cat([row["prompts"], TOK.encode(" " + answer), row["responses"]])
    t = len(row["responses"])
    return sequence_logprobs(model, ids)[len(ids) - t - 1: len(ids) - 1]


def read_advantages(tq, batch) -> list[torch.Tensor]:
    data = tq.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["advantages"])
    return list(data["advantages"].unbind())


def group_a(rows) -> list[float]:
    """A of every row from the written-out GRPO formula, groups in sampling order."""
    a = [0.0] * len(rows)
    for uid in GROUPS:
        ix = [i for i, r in enumerate(rows) if r["uid"] == uid]
        for i, v in zip(ix, expected_grpo([float(rows[i]["rm_scores"].sum()) for i in ix])):
            a[i] = v
    return a


def test_cepo_step_one_logprob_call_and_a_hat(tq, model, engine):
    """Teacher rows scored by verl's own engine (FSDP2-sharded module, fixed log-prob
    micro-batches of 4)."""
    assert type(engine.module).__name__ == "FSDPQwen3ForCausalLM"
    batch, rows = put_batch(tq, model)
    try:
        trainer = make_trainer(  # a resumed run at step 13: λ from the step
            model, tq, 13, "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            engine=engine)
        metrics: dict = {}
        trainer._compute_advantage(batch, metrics)
        lam = 0.5 * (1 - 12 / 25)
        assert metrics["cepo/lambda"] == pytest.approx(lam)

        (call,) = trainer.actor_rollout_wg.calls  # both teachers in ONE log-prob call
        assert call["extra_info"]["compute_loss"] is False
        assert "no_lora_adapter" not in call["extra_info"]
        scored = [i for i, r in enumerate(rows) if r["uid"] in ("g0", "g1")]
        with_neg = [i for i in scored if rows[i]["uid"] == "g0"]
        expected_rows = [(i, GROUPS[rows[i]["uid"]][1]) for i in scored] + \
            [(i, "5") for i in with_neg]  # T+ rows, then T- rows (r- of g0 is "5")
        assert len(call["input_ids"]) == 12  # 9 rows, the last repeated to fill micro-batches
        assert all(torch.equal(x, call["input_ids"][8]) for x in call["input_ids"][9:])
        for ids, (i, answer) in zip(call["input_ids"], expected_rows):
            r = rows[i]
            assert torch.equal(ids, torch.cat([r["prompts"], TOK.encode(" " + answer),
                                               r["responses"]]))
        assert metrics["cepo/teacher_rows"] == len(expected_rows)

        a = group_a(rows)
        got = read_advantages(tq, batch)
        for i, r in enumerate(rows):
            mask = r["response_mask"].bool()
            if r["uid"] == "g2":
                assert torch.equal(got[i], torch.zeros(len(mask)))
                continue

            pos = teacher_logprobs(model, r, GROUPS[r["uid"]][1])
            # g1 has no boxed wrong answer: T- is the student (RLSD for that group)
            neg = teacher_logprobs(model, r, "5") if i in with_neg else r["old_log_probs"]
            want = torch.where(mask, expected_a_hat(a[i], pos, neg, lam, 0.5), 0.0)
            torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5)
        assert metrics["cepo/rows_fallback"] == 3.0
        # the teacher rows are gone from TransferQueue
        assert not tq.kv_list("cepo").get("cepo")
    finally:
        tq.kv_clear(keys=batch.keys, partition_id="train")


def test_lambda_zero_leaves_grpo_and_runs_no_teacher(tq, model):
    batch, rows = put_batch(tq, model)
    try:
        trainer = make_trainer(model, tq, 26)  # T_warm = 25: λ = 0 from step 26
        metrics: dict = {}
        trainer._compute_advantage(batch, metrics)
        assert metrics["cepo/lambda"] == 0.0 and trainer.actor_rollout_wg.calls == []
        a = group_a(rows)
        for i, (got, r) in enumerate(zip(read_advantages(tq, batch), rows)):
            torch.testing.assert_close(got, a[i] * r["response_mask"].float())
    finally:
        tq.kv_clear(keys=batch.keys, partition_id="train")


def test_base_teacher_and_positive_fallback(tq, model):
    batch, rows = put_batch(tq, model)
    try:
        trainer = make_trainer(model, tq, 1, "cepo.teacher_model=base",
                               "cepo.neg_fallback=positive", "actor_rollout_ref.model.lora_rank=8")
        wg = trainer.actor_rollout_wg  # two data-parallel ranks: rows must split evenly
        wg._dispatch_info, wg._query_dispatch_info = {}, lambda role: [0, 1]
        trainer._compute_advantage(batch, {})
        (call,) = wg.calls
        assert call["extra_info"]["no_lora_adapter"] is True  # verl's frozen-base switch
        assert len(call["keys"]) == 10  # 9 teacher rows + 1 repeated to fill the second rank
        assert torch.equal(call["input_ids"][9], call["input_ids"][8])
        a = group_a(rows)
        got = read_advantages(tq, batch)
        for i, r in enumerate(rows):
            if r["uid"] == "g1":  # no r-: T- = T+, Δ = 0, Â = A
                torch.testing.assert_close(got[i], a[i] * r["response_mask"].float())
            elif r["uid"] == "g0":  # the teachers ran and moved Â off A
                assert not torch.allclose(got[i], a[i] * r["response_mask"].float())
    finally:
        tq.kv_clear(keys=batch.keys, partition_id="train")
