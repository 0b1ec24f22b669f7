"""FSDP2 spike for the LM paradigm (issue 14, item 7): 2 gloo ranks with ``fully_shard`` per decoder layer
train a tiny tied GQA Llama exactly like 1 process with the same global batch, keep the tie, and hand
the weights around as the engine will for growth (full state dict on rank 0, broadcast load).

Not yet an engine option; this pins down the torch 2.14 calls the integration will use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from compt.paradigms.lm.loss import forward_lm
from compt.paradigms.lm.models import build_model, llama_cfg

pytestmark = pytest.mark.distributed

CFG = llama_cfg(
    width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=48, vocab_size=61, context_length=32, tied=True
)
STEPS, LR = 3, 1e-2

_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, set_model_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from compt.paradigms.lm.loss import forward_lm
    from compt.paradigms.lm.models import build_model

    cfg, steps, lr, out = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def sharded(seed):
        torch.manual_seed(seed)
        model = build_model(cfg)
        for layer in model.model.layers:  # one FSDP unit per decoder layer, the rest in the root
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    model = sharded(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens = torch.randint(0, cfg["vocab_size"], (8, 17), generator=torch.Generator().manual_seed(1))
    local = tokens.chunk(world)[rank]
    losses = []
    for _ in range(steps):
        loss = forward_lm(model, local).loss
        loss.backward()  # reduce-scatter averages the gradients over ranks
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, out + ".full.pt")

    # growth's hand-off: rank 0 holds the (grown) full state dict, every rank gets its shards
    fresh = sharded(100 + rank)  # a different init on every rank: the load must overwrite all of it
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    # a copy: the load swaps the dict's entries for DTensor shards (measured on torch 2.14)
    set_model_state_dict(fresh, dict(full) if rank == 0 else {}, options=options)
    unchanged = all(type(v) is torch.Tensor for v in full.values())
    with torch.no_grad():
        logits = fresh(input_ids=tokens[:, :-1]).logits
    if rank == 0:
        torch.save(logits, out + ".logits.pt")
    json.dump({"losses": losses, "tied": tied, "unchanged": unchanged}, open(f"{out}.{rank}.json", "w"))
    dist.destroy_process_group()
    """
)


def _reference():
    """One process, the whole batch, the same init and optimizer."""
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    tokens = torch.randint(0, CFG["vocab_size"], (8, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(STEPS):
        loss = forward_lm(model, tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    return model, losses, logits


def test_fsdp2_on_two_gloo_ranks_matches_one_process(tmp_path):
    script = tmp_path / "fsdp.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script), json.dumps(CFG), str(STEPS), str(LR), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    model, losses, logits = _reference()
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert got["tied"]  # fully_shard kept lm_head and the embedding one parameter
        assert got["losses"] == pytest.approx(losses, abs=1e-5, rel=1e-5)
    assert ranks[0]["unchanged"]
    full = torch.load(tmp_path / "out.full.pt", weights_only=True)  # plain tensors, rank 0's full copy
    reference = model.state_dict()
    assert set(full) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(full[key], value, atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(full["lm_head.weight"], full["model.embed_tokens.weight"], atol=0, rtol=0)
    # the broadcast load reproduced the trained model on fresh, differently initialized shards
    got = torch.load(tmp_path / "out.logits.pt", weights_only=True)
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)
