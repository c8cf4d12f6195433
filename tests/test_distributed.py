"""The distributed path on CPU: steel_fsd.engine.launch runs N gloo processes; training shards the data by rank,
DDP keeps the replicas equal, and evaluation is gathered on rank 0."""
import itertools
import json
from pathlib import Path

import pytest
import torch

from steel_fsd.engine import launch as launch_mod
from steel_fsd.engine.launch import launch

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "configs" / "demo" / "faster_rcnn_R18_FPN_synth_neu.yaml"

# The workers below run in processes started by `spawn`: they import this module again, so they are top-level
# functions and take everything they need as arguments.


def _comm_worker(out: str) -> None:
    import torch.distributed as dist
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    from steel_fsd.engine.launch import create_ddp_model

    ddp = create_ddp_model(torch.nn.Linear(2, 2))
    record = {"backend": dist.get_backend(), "rank": comm.get_rank(), "world": comm.get_world_size(),
              "local_rank": comm.get_local_rank(), "local_size": comm.get_local_size(),
              "gathered": comm.all_gather(comm.get_rank() * 10), "ddp": isinstance(ddp, DistributedDataParallel),
              "threads": torch.get_num_threads()}
    Path(out, f"comm_rank{comm.get_rank()}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_cpu_launch_uses_gloo_and_detectron2_comm(tmp_path):
    assert not torch.cuda.is_available(), "this test is for the CPU path"
    launch(_comm_worker, 2, dist_url="auto", args=(str(tmp_path),))
    records = [json.loads((tmp_path / f"comm_rank{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(records):
        assert rec["backend"] == "gloo" and rec["rank"] == r and rec["world"] == 2
        assert rec["local_rank"] == r and rec["local_size"] == 2  # Detectron2's local process group is set up
        assert rec["gathered"] == [0, 10]
        assert rec["ddp"]  # a CPU model is wrapped in DistributedDataParallel (no device_ids)


@pytest.mark.parametrize("fails", [False, True])
def test_cpu_worker_destroys_its_process_group(tmp_path, monkeypatch, fails):
    """A worker that leaves its gloo group to interpreter exit can abort (SIGABRT) after succeeding."""
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "_LOCAL_PROCESS_GROUP"):
        monkeypatch.setattr(comm, "_LOCAL_PROCESS_GROUP", None)
    seen = []

    def work():
        seen.append((dist.is_initialized(), dist.get_backend(), comm.get_world_size()))
        if fails:
            raise RuntimeError("boom")

    url = (tmp_path / "rendezvous").as_uri()
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            launch_mod._cpu_worker(0, work, 1, 1, 0, url, (), launch_mod.DEFAULT_TIMEOUT)
    else:
        launch_mod._cpu_worker(0, work, 1, 1, 0, url, (), launch_mod.DEFAULT_TIMEOUT)
    assert seen == [(True, "gloo", 1)]
    assert not dist.is_initialized()


def test_cuda_or_single_process_delegates_to_detectron2(monkeypatch):
    calls = []
    monkeypatch.setattr(launch_mod, "_d2_launch", lambda *a, **k: calls.append((a, k)))
    launch(print, 1)  # one process: Detectron2's launch (which calls main_func directly)
    monkeypatch.setattr(launch_mod.torch.cuda, "is_available", lambda: True)
    launch(print, 4, num_machines=2, machine_rank=1, dist_url="tcp://h:1", args=(1,))  # CUDA: NCCL, unchanged
    assert [c[0][1] for c in calls] == [1, 4]
    assert calls[1][1] == {"num_machines": 2, "machine_rank": 1, "dist_url": "tcp://h:1", "args": (1,),
                           "timeout": launch_mod.DEFAULT_TIMEOUT}


def test_episodic_sampler_shards_one_stream_by_rank():
    from steel_fsd.data.episodic import EpisodicBatchSampler

    dicts = [{"annotations": [{"category_id": i % 4}]} for i in range(40)]
    stream = list(itertools.islice(iter(EpisodicBatchSampler(dicts, 2, 2, seed=5, rank=0, world_size=1)), 12))
    shards = [list(itertools.islice(iter(EpisodicBatchSampler(dicts, 2, 2, seed=5, rank=r, world_size=3)), 4))
              for r in range(3)]
    assert [shards[i % 3][i // 3] for i in range(12)] == stream  # rank r takes episodes r, r + 3, ...


TINY = ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "4", "INPUT.HARMONIZE.RESIZE", "96",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "INPUT.HARMONIZE.NORMALIZE_MAX_IMAGES", "8", "SEED", "0",
        "DATASETS.TRAIN", "('t_dist_train',)", "DATASETS.TEST", "('t_dist_test',)"]


def _register(root: str) -> None:
    from detectron2.data import DatasetCatalog

    from steel_fsd.data import register_neu

    for split in ("train", "test"):
        if f"t_dist_{split}" not in DatasetCatalog.list():
            register_neu(f"t_dist_{split}", root, split=split)


def _train_worker(root: str, out: str) -> None:
    """tools/train_net.py's main with 2 images per rank; records the images each rank's mappers read."""
    import torch.distributed as dist
    import train_net
    from detectron2.engine import default_argument_parser
    from detectron2.utils import comm

    import steel_fsd.engine.trainer as trainer_mod

    _register(root)
    rank = comm.get_rank()

    class RecordingMapper(trainer_mod.SteelDatasetMapper):
        def __call__(self, d):
            with open(Path(out, f"{'train' if self.is_train else 'test'}_rank{rank}.txt"), "a") as f:
                f.write(d["file_name"] + "\n")
            return super().__call__(d)

    record = {}

    class RecordingTrainer(trainer_mod.Trainer):
        def train(self):
            results = super().train()
            record.update(model=type(self.model).__name__,
                          param_sum=float(sum(p.detach().double().sum() for p in self.model.parameters())))
            return results

    trainer_mod.SteelDatasetMapper = RecordingMapper  # used by Trainer.build_train_loader / build_test_loader
    train_net.Trainer = RecordingTrainer
    args = default_argument_parser().parse_args(["--config-file", str(CFG), "--num-gpus", "2",
                                                 "OUTPUT_DIR", str(Path(out, "run")), *TINY])
    results = train_net.main(args)
    Path(out, f"result_rank{rank}.json").write_text(json.dumps(
        {"backend": dist.get_backend(), "results": results, **record}))


@pytest.mark.slow
def test_two_cpu_processes_train_on_distinct_shards_and_gather_evaluation(tmp_path):
    from detectron2.data import DatasetCatalog

    from steel_fsd.synthetic import make_neu_synthetic

    root = make_neu_synthetic(tmp_path / "neu", n_per_class=7, seed=0)
    _register(str(root))
    train, test = DatasetCatalog.get("t_dist_train"), DatasetCatalog.get("t_dist_test")
    assert len(train) >= 16  # 4 iterations x 2 images x 2 ranks fit in one pass of the shuffled stream

    launch(_train_worker, 2, dist_url="auto", args=(str(root), str(tmp_path)))

    read = [(tmp_path / f"train_rank{r}.txt").read_text().split() for r in range(2)]
    for names in read:
        assert len(names) == len(set(names)) == 4 * 2  # each rank: 4 iterations of 2 images
    assert not set(read[0]) & set(read[1])  # disjoint shards of one permutation, as TrainingSampler gives

    tested = [(tmp_path / f"test_rank{r}.txt").read_text().split() for r in range(2)]
    assert tested[0] and tested[1] and not set(tested[0]) & set(tested[1])  # inference is sharded too
    assert sorted(tested[0] + tested[1]) == sorted(d["file_name"] for d in test)

    recs = [json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in range(2)]
    assert [r["backend"] for r in recs] == ["gloo", "gloo"]
    assert [r["model"] for r in recs] == ["DistributedDataParallel"] * 2
    assert recs[0]["param_sum"] == pytest.approx(recs[1]["param_sum"], rel=1e-9)  # gradients were all-reduced
    assert set(recs[0]["results"]["t_dist_test"]) == {"bbox", "prf", "image_level"}
    assert recs[1]["results"] == {"t_dist_test": {}}  # only rank 0 gets results

    inference = tmp_path / "run" / "inference" / "t_dist_test"
    predictions = torch.load(inference / "instances_predictions.pth", weights_only=False)  # gathered on rank 0
    assert sorted(p["image_id"] for p in predictions) == sorted(d["image_id"] for d in test)
    prf = json.loads((inference / "prf_results.json").read_text())
    n_gt = sum(1 for d in test for a in d["annotations"] if not a.get("iscrowd", 0))
    assert prf["TP"] + prf["FN"] == n_gt  # PRF counts of both ranks were summed
