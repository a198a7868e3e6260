"""Print diffdrr's requirements minus torch/torchvision (no CPU torchvision build exists here)."""

from importlib.metadata import requires

skip = ("torch", "torchvision", "torchaudio")
reqs = [r.split(";")[0].strip() for r in (requires("diffdrr") or []) if "extra ==" not in r]
print(" ".join(r for r in reqs if not r.replace(" ", "").startswith(skip)))
