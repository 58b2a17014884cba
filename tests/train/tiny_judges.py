"""Tiny local stand-ins for the erasure metrics' weights, built in the test (nothing is downloaded): a NudeNet-style
ONNX detector whose class scores are a known function of each grid cell's mean colour, and a tiny CLIP folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from train.evaluation.nudity import NUDENET_LABELS


def colour_logits(**rows: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(W [3, 18], b [18]) giving class `name` the logit wr r + wg g + wb b + b0 for rows name=(wr, wg, wb, b0) of a
    cell's mean colour (r, g, b in [0, 1]); every other class -10 (score 4.5e-5)."""
    w, b = np.zeros((3, len(NUDENET_LABELS)), np.float32), np.full(len(NUDENET_LABELS), -10.0, np.float32)
    for name, (wr, wg, wb, b0) in rows.items():
        i = NUDENET_LABELS.index(name)
        w[:, i], b[i] = (wr, wg, wb), b0
    return w, b


def tiny_nudenet(path: Path, weights: np.ndarray, bias: np.ndarray, size: int = 32, grid: int = 4,
                 box_scale: float = 1.0) -> Path:
    """A NudeNet v3-shaped ONNX detector: input 'images' [1, 3, size, size] in [0, 1], output [1, 22, grid^2] whose
    anchor k (row-major grid cell) has the box (cell centre, box_scale cell sizes wide and high) and the class scores
    sigmoid(mean colour of the cell @ weights + bias)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cell = size // grid
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    boxes = np.stack([(xs.ravel() + 0.5) * cell, (ys.ravel() + 0.5) * cell, np.full(grid * grid, box_scale * cell),
                      np.full(grid * grid, box_scale * cell)])[None].astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (weights.astype(np.float32), "W"), (bias.astype(np.float32), "b"), (boxes, "boxes"),
        (np.array([1, 3, grid * grid], np.int64), "shape"))]
    nodes = [helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[cell, cell], strides=[cell, cell]),
             helper.make_node("Reshape", ["pooled", "shape"], ["cells"]),
             helper.make_node("Transpose", ["cells"], ["colours"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["colours", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["probs"]),
             helper.make_node("Transpose", ["probs"], ["scores"], perm=[0, 2, 1]),
             helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1)]
    graph = helper.make_graph(nodes, "tiny_nudenet",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                                             [1, 4 + weights.shape[1], grid * grid])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.12
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def tiny_clip_folder(folder: Path, image_size: int = 8) -> Path:
    """A tiny CLIPModel + CLIPProcessor (image_size px images, the byte-level CLIP tokenizer of the tiny pipelines),
    saved as a local CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from models.tiny_pipelines import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=4)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}), tokenizer=tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def template_nudenet(path: Path, templates: torch.Tensor, radius: float, label: str = "FEMALE_BREAST_EXPOSED") -> Path:
    """A NudeNet v3-shaped ONNX detector with one anchor (the whole image) that finds `label` in an image whose mean
    squared distance to the nearest of `templates` [K, 3, S, S] (the detector's input space: letterboxed, in [0, 1])
    is below `radius` (score sigmoid(10 (radius - d) / radius): ~1 at a template, ~0 at twice the radius); every
    other class scores 0.01. A detector keyed on what one model draws."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size = templates.shape[-1]
    i = NUDENET_LABELS.index(label)
    consts = {"T": templates.numpy().astype(np.float32), "radius": np.array([radius], np.float32),
              "gain": np.array([10.0 / radius], np.float32), "shape": np.array([1, 1, 1], np.int64),
              "before": np.full((1, i, 1), 0.01, np.float32),
              "after": np.full((1, len(NUDENET_LABELS) - i - 1, 1), 0.01, np.float32),
              "boxes": np.array([size / 2, size / 2, size, size], np.float32).reshape(1, 4, 1)}
    nodes = [helper.make_node("Sub", ["images", "T"], ["diff"]),
             helper.make_node("Mul", ["diff", "diff"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["dist"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("ReduceMin", ["dist"], ["nearest"], axes=[0], keepdims=1),
             helper.make_node("Sub", ["radius", "nearest"], ["margin"]),
             helper.make_node("Mul", ["margin", "gain"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["score"]),
             helper.make_node("Reshape", ["score", "shape"], ["found"]),
             helper.make_node("Concat", ["boxes", "before", "found", "after"], ["output0"], axis=1)]
    graph = helper.make_graph(nodes, "template_nudenet",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                                             [1, 4 + len(NUDENET_LABELS), 1])],
                              [numpy_helper.from_array(a, n) for n, a in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
