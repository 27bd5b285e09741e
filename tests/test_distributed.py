"""MESA under DDP and FSDP, SAF under DDP: 2 CPU processes with gloo, checked against one process.

Each rank trains on its half of a fixed global batch; DDP/FSDP average the gradients, so the ranks follow the
single-process run on the whole batch (no BatchNorm in the model, so nothing depends on the split). The
teachers must be identical across ranks and equal to the single-process teacher; the mean loss too.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchnova

WORLD = 2
STEPS = 3
BATCH = 8  # per rank

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))


def global_batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * BATCH, 6, generator=generator)
    return x, torch.randint(0, 5, (STEPS, WORLD * BATCH), generator=generator)


def shard(module):
    from torch.distributed.fsdp import fully_shard

    for layer in (module[0], module[2]):
        fully_shard(layer)
    fully_shard(module)


def train(model, mesa, xs, ys):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for x, y in zip(xs, ys):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y) + mesa.loss(logits, x, epoch=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mesa.update()
        losses.append(loss.detach())
    return torch.stack(losses)


def full_teacher(mesa):
    state = mesa.teacher.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def _mesa_worker(rank, kind, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        if kind == "ddp":
            mesa = torchnova.MESA(model, decay=0.5, temperature=2.0, weight=0.8, start_epoch=0)
            model = nn.parallel.DistributedDataParallel(model)
        else:
            mesa = torchnova.MESA(model, decay=0.5, temperature=2.0, weight=0.8, start_epoch=0, shard=shard)
            shard(model)
        xs, ys = global_batch()
        local = slice(rank * BATCH, (rank + 1) * BATCH)
        losses = train(model, mesa, xs[:, local], ys[:, local])
        dist.all_reduce(losses)
        torch.save({"losses": losses / WORLD, "teacher": full_teacher(mesa)}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp_path, *args):
    init_file = tmp_path / "init"
    mp.spawn(worker, args=(*args, str(init_file), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_mesa_distributed_matches_single_process(kind, tmp_path):
    results = _spawn(_mesa_worker, tmp_path, kind)

    model = make_model()
    mesa = torchnova.MESA(model, decay=0.5, temperature=2.0, weight=0.8, start_epoch=0)
    xs, ys = global_batch()
    single_losses = train(model, mesa, xs, ys)
    single_teacher = full_teacher(mesa)

    for name, value in results[0]["teacher"].items():
        assert torch.equal(value, results[1]["teacher"][name]), f"teachers differ across ranks: {name}"
        # Not the kernel table: two fp32 trainings whose gradients are summed in different orders (gloo's
        # all-reduce vs one batch), for several steps: rounding of values ~1 compounds to ~1e-6.
        torch.testing.assert_close(value, single_teacher[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0]["losses"], single_losses, rtol=1e-5, atol=1e-6)
    assert not torch.equal(single_teacher["0.weight"], make_model()[0].weight.detach())  # the EMA moved


class IndexedData(torch.utils.data.Dataset):
    def __init__(self, n):
        generator = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(n, 6, generator=generator), torch.randint(0, 5, (n,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return i, self.x[i], self.y[i]


def _saf_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = IndexedData(12)
        model = nn.parallel.DistributedDataParallel(make_model())
        saf = torchnova.SAF(len(data), 5, epochs_ago=1, start_epoch=0, dtype=torch.float32)
        sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True)
        loader = torch.utils.data.DataLoader(data, batch_size=3, sampler=sampler)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        teacher_rows = []  # per batch: (rows with a teacher from last epoch, rows)
        for epoch in range(4):
            sampler.set_epoch(epoch)
            for indices, x, y in loader:
                slot = (epoch - 1) % saf.slots
                teacher_rows.append((int((saf.written_epoch[indices, slot] == epoch - 1).sum()), len(indices)))
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y) + saf.loss(logits, indices, epoch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        torch.save({"bank": saf.bank, "written": saf.written_epoch, "teacher_rows": torch.tensor(teacher_rows)},
                   os.path.join(out_dir, f"{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_saf_under_ddp_keeps_every_sample_on_every_rank(tmp_path):
    results = _spawn(_saf_worker, tmp_path)
    assert torch.equal(results[0]["bank"], results[1]["bank"])
    assert torch.equal(results[0]["written"], results[1]["written"])
    assert bool((results[0]["written"].max(dim=1).values == 3).all())  # every sample recorded in the last epoch
    for result in results:
        rows = result["teacher_rows"]
        first_epoch = len(rows) // 4
        # After epoch 0 every sample has last epoch's logits, whichever rank the shuffled sampler gave it to.
        assert bool((rows[first_epoch:, 0] == rows[first_epoch:, 1]).all())
        assert int(rows[:first_epoch, 0].sum()) == 0
