"""distill.kd: the loss against a reference, learning, determinism, resume, teacher-logit cache, sparsity kept."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from optforge.passes.distill import kd
from optforge.passes.distill.kd import kd_loss, window_order

SMALL = {"steps": 6, "batch_size": 2, "seq_len": 32, "max_windows": 8, "lr": 3e-3, "warmup_steps": 0, "log_every": 2, "checkpoint_every": 2}


def test_kd_loss_matches_full_vocabulary_kl_when_top_k_is_everything():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 50), torch.randn(6, 50) * 2
    top = teacher.topk(50, dim=-1)
    for t in (1.0, 2.0):
        ref = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean") * t * t
        torch.testing.assert_close(kd_loss(student, top.values, top.indices, t), ref, rtol=1e-5, atol=1e-6)
    assert float(kd_loss(teacher, top.values, top.indices, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_window_order_is_seeded_and_covers_each_epoch():
    a, b = window_order(10, 7, 3, seed=1), window_order(10, 7, 3, seed=1)
    assert torch.equal(a, b) and a.shape == (7, 3)
    assert sorted(a.flatten()[:10].tolist()) == list(range(10))
    assert not torch.equal(a, window_order(10, 7, 3, seed=2))


def test_distillation_lowers_the_loss_and_caches_teacher_logits(kd_run, student_artifact, teacher_artifact, tmp_path):
    # The same two windows every step: the KD loss on them must fall.
    out = kd_run("distill.kd", student_artifact, tmp_path, teacher_artifact.path, **{**SMALL, "steps": 12, "max_windows": 2})
    info = out.layout["distillation"]
    assert info["loss_last"] < info["loss_first"] - 0.01
    assert info["teacher_cache_hit"] is False and info["tokens"] == 12 * 2 * 32
    assert {"distilled", "hf_causal_lm"} <= out.properties
    assert out.layout["structured_pruning"]["intermediate_size"] == [128, 64]  # earlier records carried along
    assert len(list((tmp_path / "teacher-logits").glob("*.safetensors"))) == 1
    again = kd_run("distill.kd", student_artifact, tmp_path, teacher_artifact.path, **{**SMALL, "max_windows": 2, "lr": 1e-3})
    assert again.layout["distillation"]["teacher_cache_hit"] is True  # a second student reuses the teacher's logits
    assert not any((tmp_path / "distill-checkpoints").rglob("state.pt"))  # finished runs leave no checkpoint


def test_interrupted_run_resumes_to_the_same_weights(kd_run, student_artifact, teacher_artifact, tmp_path, monkeypatch):
    straight = kd_run("distill.kd", student_artifact, tmp_path / "a", teacher_artifact.path, **SMALL)
    real_step, calls = kd.KnowledgeDistillation._step, []

    def crash_at_five(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(kd.KnowledgeDistillation, "_step", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        kd_run("distill.kd", student_artifact, tmp_path / "b", teacher_artifact.path, **SMALL)
    monkeypatch.setattr(kd.KnowledgeDistillation, "_step", real_step)
    resumed = kd_run("distill.kd", student_artifact, tmp_path / "b", teacher_artifact.path, **SMALL)
    assert resumed.layout["distillation"]["resumed_from_step"] == 4
    a, b = load_file(straight.path / "model.safetensors"), load_file(resumed.path / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    before = load_file(student_artifact.path / "model.safetensors")
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(a["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # frozen by default


def test_a_sparse_student_stays_sparse(kd_run, teacher_artifact, tmp_path):
    sparse = kd_run("prune.magnitude", teacher_artifact, tmp_path, teacher_artifact.path, pattern="2:4")
    out = kd_run("distill.kd", sparse, tmp_path, teacher_artifact.path, **SMALL)
    before, after = load_file(sparse.path / "model.safetensors"), load_file(out.path / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(after[key] == 0, before[key] == 0) and not torch.equal(after[key], before[key])
    assert "sparse_2_4" in out.properties
