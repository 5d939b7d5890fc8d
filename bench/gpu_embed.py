"""Embedding on a bare GPU box (torch, timm, pyarrow, pillow; no Ray): our stages vs the original.

Times, on the same generated JPEG shard:
- original: torch DataLoader (4 workers, batch 64), PIL Resize + ToTensor, forward hook on
  ``head``, fp32 on the GPU (DESIGN.md §2);
- our decode stage alone (``galaxysae.decode.decode_batch`` in a process per spare CPU);
- our encode stage alone (``galaxysae.encoder.embed``: bf16 autocast, channels_last, pinned
  memory, batch 128) on ready tensors: the ceiling;
- ours end to end: the decode processes feeding the encoder, as the Ray pipeline does.
Ends with ``target gpu_throughput_vs_original: X (goal >= 5) PASS|FAIL``.
Usage: ``python bench/gpu_embed.py [--images 8192] [--image-px 424]``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENCODER = "convnext_nano"


def make_jpegs(n: int, px: int) -> list[bytes]:
    """Procedural blobs as JPEG bytes (a few distinct ones, repeated: decode cost is per image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:px, 0:px] / px
    out = []
    for _ in range(min(n, 64)):
        cx, cy, s = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.2)
        g = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / s**2)
        img = np.stack([g, g * 0.8, g * 0.6], -1) + rng.normal(0, 0.03, (px, px, 3))
        buf = io.BytesIO()
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def _decode_chunk(args):
    import pyarrow as pa

    from galaxysae.decode import decode_batch

    images, size = args
    t = pa.table({"id_str": [str(i) for i in range(len(images))],
                  "image": pa.array([{"bytes": b, "path": None} for b in images],
                                    pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "path": ["bench"] * len(images)})
    return decode_batch(t, image_size=size)["pixels"]


def original(images: list[bytes], size: int, device: str) -> float:
    import timm
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    class Jpegs(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return tf(Image.open(io.BytesIO(images[i])).convert("RGB"))

    model = timm.create_model(ENCODER, pretrained=False, num_classes=0).eval().to(device)
    feats = []
    model.head.register_forward_hook(lambda m, i, o: feats.append(o.detach().cpu()))
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in DataLoader(Jpegs(), batch_size=64, num_workers=4):
            model(x.to(device))
    return len(images) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--image-px", type=int, default=424)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--decoders", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    a = ap.parse_args()

    import torch

    from galaxysae import encoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"bench/gpu_embed.py: {a.images} images {a.image_px}px -> {a.size}px on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'no GPU'}), "
          f"{a.decoders} decode processes", flush=True)
    images = make_jpegs(a.images, a.image_px)
    chunks = [(images[i:i + a.batch], a.size) for i in range(0, len(images), a.batch)]

    rate_orig = original(images, a.size, device)
    print(f"  original fp32 loop      {rate_orig:10.1f} img/s", flush=True)

    with ProcessPoolExecutor(a.decoders) as pool:
        list(pool.map(_decode_chunk, chunks[:a.decoders]))  # start the workers
        t0 = time.perf_counter()
        decoded = list(pool.map(_decode_chunk, chunks))
        rate_decode = len(images) / (time.perf_counter() - t0)
    print(f"  ours: decode stage      {rate_decode:10.1f} img/s", flush=True)

    model, info = encoder.load(ENCODER, pretrained=False, image_size=a.size, device=device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    precision = encoder.resolve_precision("auto", device)
    encoder.embed(model, decoded[0], device, precision)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in decoded:
        encoder.embed(model, x, device, precision)
    rate_encode = len(images) / (time.perf_counter() - t0)
    print(f"  ours: encode stage {precision:<4} {rate_encode:10.1f} img/s (model ceiling)", flush=True)
    del decoded

    with ProcessPoolExecutor(a.decoders) as pool:
        list(pool.map(_decode_chunk, chunks[:a.decoders]))
        t0 = time.perf_counter()
        for x in pool.map(_decode_chunk, chunks):
            encoder.embed(model, x, device, precision)
        rate_ours = len(images) / (time.perf_counter() - t0)
    print(f"  ours: end to end        {rate_ours:10.1f} img/s", flush=True)
    ratio = rate_ours / rate_orig
    print(f"target gpu_throughput_vs_original: {ratio:.2f} (goal >= 5) {'PASS' if ratio >= 5 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
