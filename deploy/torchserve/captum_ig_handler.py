"""TorchServe's stock explanation path, for the peer benchmark (benchmarks/peers.py).

``VisionHandler`` (TorchServe 0.12) answers ``/explanations`` with Captum Integrated
Gradients, 15 steps, zero baseline, as nested JSON lists. Only the image transform is
replaced: the stock ``ImageClassifier`` builds it with torchvision, which this machine does
not import, so it is written with PIL and torch here from ``preprocess.json`` (input size,
mean, std) shipped in the ``.mar``. The model is a TorchScript file (``model.pt``).
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from ts.torch_handler.vision_handler import VisionHandler


class CaptumImageClassifier(VisionHandler):
    """ImageClassifier without torchvision; inherits the stock Captum IG explain path."""

    topk = 5

    def initialize(self, context):
        model_dir = context.system_properties.get("model_dir")
        with open(os.path.join(model_dir, "preprocess.json")) as handle:
            spec = json.load(handle)
        self.height, self.width = spec["height"], spec["width"]
        self.mean = torch.tensor(spec["mean"]).view(-1, 1, 1)
        self.std = torch.tensor(spec["std"]).view(-1, 1, 1)
        super().initialize(context)

    def image_processing(self, image):
        image = image.convert("RGB").resize((self.width, self.height))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        return (pixels.permute(2, 0, 1) - self.mean) / self.std

    def postprocess(self, data):
        probabilities = F.softmax(data, dim=1)
        top, classes = torch.topk(probabilities, self.topk, dim=1)
        rows = zip(classes.tolist(), top.tolist(), strict=True)
        return [dict(zip(map(str, c), p, strict=True)) for c, p in rows]
