"""`python -m cifarlab.models`: list the registered models with their parameter counts."""

from cifarlab.models import create_model, model_names, model_spec

for name in model_names():
    count = sum(p.numel() for p in create_model(name).parameters())
    print(f"{name:20s} {count:>12,d}  {model_spec(name).source}")
