"""Put on ``PYTHONPATH`` of the vLLM processes vlmkit starts: its ``sitecustomize`` lets a CUDA build
of torchvision import beside the CPU build of torch (see ``sitecustomize.py``)."""
