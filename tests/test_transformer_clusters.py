"""transformer-clusters: cluster counting, the particle flow of one block, a tiny run."""

import torch

from lmech.experiments import run_experiment
from lmech.experiments.transformer_clusters import cluster_counts, particle_flow, value_spectrum
from lmech.models import Transformer


def test_cluster_counts():
    h = torch.tensor([[[1.0, 0], [1, 0.01], [0, 1], [-1, 0]], [[1.0, 0], [0.99, 0.1], [0.96, 0.28], [0.9, 0.43]]])
    assert cluster_counts(h, 0.1).tolist() == [3.0, 1.0]     # the second is a chain: one component


def test_particle_flow_first_step_is_the_block_attention():
    torch.manual_seed(0)
    net = Transformer(vocab_size=7, seq_len=4, n_out=5, d_model=8, n_heads=2, n_layers=1, d_mlp=16)
    x = net.features(torch.randint(0, 7, (3, 4)))[0].detach()
    block = net.blocks[0]
    small = particle_flow(block, x, 1e-4, 1e-4)
    with torch.no_grad():
        assert torch.allclose((small - x) / 1e-4, block.attn(block.ln1(x)), atol=1e-3)
    ev = value_spectrum(block)
    w = block.attn.proj.weight @ block.attn.qkv.weight[16:]
    assert torch.allclose(ev.abs().sort().values, torch.linalg.eigvals(w.double()).abs().sort().values)


def test_tiny_run(tmp_path):
    s = run_experiment("transformer-clusters", {"p": 7, "width": 8, "heads": 2, "layers": 1, "steps": 20,
                                                "t_long": 2.0, "dt": 0.5, "eval_sequences": 16}, seed=0, out=tmp_path)
    assert s["state"] == "done", s["message"]
    assert len(s["checks"]) == 2 and len(s["result"]["measured_clusters"]) == 2


def test_probes_economy_adds_monitor_columns_and_changes_no_training_metric(tmp_path):
    from probes_parity import assert_probes_leave_training_unchanged

    tiny = {"p": 7, "width": 8, "heads": 2, "layers": 1, "steps": 60, "t_long": 2.0, "dt": 0.5, "eval_sequences": 16}
    _, probed = assert_probes_leave_training_unchanged("transformer-clusters", tiny, tmp_path)
    assert probed.dropna(subset=["probe/loss"])["step"].tolist() == [50]
