"""The compression report: counts checked by hand, timings sane, and the line that compares two models."""
import torch
from torch import nn

from kd.cost import compare, count_flops, count_parameters, measure, weights_bytes


def test_flops_of_known_layers_equal_the_hand_count():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    assert count_flops(linear, 4) == 2 * (3 * 4 * 4) * 5  # one multiply-add per weight; bias not counted
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    assert count_flops(conv, 8) == 2 * 8 * 3 * 3 * 3 * 8 * 8  # 2 x out_ch x in_ch x k x k x H_out x W_out
    assert count_flops(conv, 8, batch=4) == 4 * count_flops(conv, 8)


def test_parameters_and_size():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) == 8 * 27 + 8 + 16 + 8 * 36 * 2 + 2
    assert weights_bytes(model) > 4 * count_parameters(model)  # float32 weights, buffers and a header


def test_measure_reports_positive_sane_timings():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2)).train()
    report = measure(model, 16, "cpu", batch=32)
    assert model.training  # left as it was
    assert report["parameters"] == count_parameters(model) and report["macs"] * 2 == report["flops"] > 0
    assert report["latency_ms_batch1"] > 0 and report["latency_ms_batch"] > 0 and report["batch"] == 32
    assert report["images_per_s_batch"] >= report["images_per_s_batch1"]  # batching never loses on a tiny model
    assert report["threads"] == torch.get_num_threads() and report["device"] == "cpu" and report["device_name"]
    assert report["timing"]["warmup"] == 2 and min(report["timing"]["repeats"]) >= 3


def test_comparison_line():
    teacher = {"parameters": 4_800_000, "flops": 700, "images_per_s_batch1": 10, "images_per_s_batch": 100,
               "batch": 64, "device": "cpu", "device_name": "X"}
    student = {"parameters": 400_000, "flops": 70, "images_per_s_batch1": 50, "images_per_s_batch": 700,
               "batch": 64, "device": "cpu", "device_name": "X"}
    out = compare(teacher, student, 0.96, 0.95)
    assert out["summary"] == ("student 0.4M params, 12x smaller, 7.0x faster than the teacher on this CPU (batch 64), "
                              "balanced accuracy 0.95 against the teacher's 0.96")
    assert out["smaller"] == 12 and out["faster"] == 7 and out["faster_batch1"] == 5
    assert compare(student, student)["summary"].startswith("student 0.4M params, the same size, as fast as the teacher")
