"""Encode stage throughput against a plain ``for batch in loader: model.encode_image(batch)`` loop.

    python benchmarks/encode_speed.py [--images 1000] [--batch-size 128] [--backbone effnet_lite0]

Both run in this process on the same images (CIFAR-10 JPEGs from ../shared/data,
or generated images with --synthetic) with the same batch size; the stage's
figure includes its shard writes. Prints images/s for each and the ratio; writes
JSON to benchmarks/results/encode_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, markdown_table, shared_data, write_json  # noqa: E402


def image_folder(n: int, synthetic: bool, data: str | None, work: Path) -> Path:
    """A root/<class>/*.jpg folder of ``n`` images."""
    root = work / "images"
    if synthetic:
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(n):
            d = root / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg")
        return root
    with tarfile.open(shared_data(data) / "images" / "cifar10-jpeg.tar.gz") as t:
        members = [m for m in t.getmembers() if m.isfile() and m.name.split("/")[-3:-2] == ["train"]]
        per_class = max(1, n // 10)
        by_class: dict[str, list] = {}
        for m in members:
            by_class.setdefault(m.name.split("/")[-2], []).append(m)
        for c, ms in sorted(by_class.items()):
            for m in sorted(ms, key=lambda m: m.name)[:per_class]:
                m.name = f"{c}/{Path(m.name).name}"
                t.extract(m, root)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backbone", default="effnet_lite0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "encode_speed.json"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. backbone.pretrained=null")
    a = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from ssl_pipeline.artifacts import ArtifactCache
    from ssl_pipeline.backbones import load_backbone
    from ssl_pipeline.data.images import TableImages, collate_skipping
    from ssl_pipeline.data.sources import build_table
    from ssl_pipeline.stages import encode

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        root = image_folder(a.images, a.synthetic, a.data, work)
        ov = [f"backbone={a.backbone}", "data=image_folder", f"data.root={root}", "data.labeled_per_class=1",
              f"encode.batch_size={a.batch_size}", f"encode.num_workers={a.num_workers}",
              f"paths.cache_dir={work / 'cache'}"]
        if a.image_size:
            ov.append(f"backbone.image_size={a.image_size}")
        ov += a.overrides
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=ov)
        table = build_table(cfg.data)
        device = encode.pick_device(cfg.encode.device)

        # 1. the plain loop: same images, same preprocessing, same batch size
        bb = load_backbone(cfg.backbone, device=device)
        ds = TableImages(table, np.arange(len(table)), bb.preprocess)
        loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, collate_fn=collate_skipping,
                                             num_workers=a.num_workers)
        with torch.no_grad():  # warm-up batch (CUDA context, kernels) outside the timing
            images = next(iter(loader))[0]
            bb.model.encode_image(images.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
        t = time.perf_counter()
        n = 0
        with torch.no_grad():
            for images, rows, _ in loader:
                bb.model.encode_image(images.to(device))
                n += len(rows)
        if device.type == "cuda":
            torch.cuda.synchronize()
        plain = n / (time.perf_counter() - t)
        del bb

        # 2. the encode stage (fresh cache: everything is computed, shards written)
        t = time.perf_counter()
        _, m, _ = encode.run(cfg, table, ArtifactCache(work / "cache"))
        stage = m["encode/images_per_s"]  # the stage's own figure: its loop and shard writes
        stage_wall = m["encode/n_images"] / (time.perf_counter() - t)  # also counting model loading
    rows = [["plain loop", round(plain, 1)], ["encode stage", round(stage, 1)],
            ["encode stage incl. model load", round(stage_wall, 1)]]
    print(f"\nEncode throughput, {a.images} images, {a.backbone} ({cfg.backbone.image_size or 'native'} px), "
          f"batch {a.batch_size}, device {device}, torch threads {torch.get_num_threads()}\n")
    print(markdown_table(["method", "images/s"], rows))
    print(f"\nratio encode stage / plain loop: {stage / plain:.2f}x")
    write_json(a.out, {"images": a.images, "backbone": a.backbone, "batch_size": a.batch_size, "device": str(device),
                       "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "image_size": cfg.backbone.image_size, "overrides": a.overrides,
                       "synthetic": a.synthetic, "num_workers": a.num_workers,
                       "plain_images_per_s": plain, "stage_images_per_s": stage,
                       "stage_wall_images_per_s": stage_wall, "ratio": stage / plain})


if __name__ == "__main__":
    main()
