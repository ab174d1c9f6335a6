"""The reference-style loop the speed benchmark measures kd-search against, written as the reference projects wrote
it: a DataLoader over image files with PIL transforms, the teacher run forward on every batch, fp32."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import Profile, config, gpu_peak


def seed_style(p: Profile, work: Path, epochs: int, teacher_epochs: int = 0) -> dict[str, Any]:
    """The reference projects' loop: PIL decoding and transforms in DataLoader workers every epoch, teacher forward on
    every batch, fp32, soft KD (T=5, alpha 0.5), SGD with StepLR. The teacher is the one kd-search cached, or, with
    `teacher_epochs`, one distillation as the reference projects ran it from the start: the teacher fine-tuned that
    many epochs by the same kind of loop (cross-entropy, AdamW at the profile's teacher rate), inside the timing."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from sklearn.metrics import balanced_accuracy_score
    from torchvision import transforms as T

    from kd.data import load_dataset
    from kd.models import create_model, mean_std
    from kd.teacher import load_teacher_model, prepare_teacher

    cfg = config(p, work)
    data = load_dataset(cfg.data, progress=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if teacher_epochs:
        teacher = create_model(cfg.teacher, len(data.classes), p["size"]).to(device)
    else:
        teacher, _ = load_teacher_model(cfg, data, prepare_teacher(cfg, data, epochs=1, progress=False).directory)
        teacher = teacher.to(device).eval()
    t_mean, t_std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in mean_std(teacher))
    torch.manual_seed(0)
    student = create_model(cfg.student, len(data.classes), p["size"]).to(device)
    mean, std = mean_std(student)
    s_mean, s_std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    size = p["size"]
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(), T.RandomRotation(15),
                          T.ColorJitter(0.2, 0.2, 0.2, 0.02), T.ToTensor(), T.Normalize(mean, std)])
    val_tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(mean, std)])

    class Files(torch.utils.data.Dataset):
        def __init__(self, split, tf):
            self.paths, self.labels, self.tf = split.paths, split.labels.tolist(), tf

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return self.tf(Image.open(self.paths[i]).convert("RGB")), self.labels[i]

    batch, workers, pin = p["batch"], p["workers"], device.type == "cuda"
    train = torch.utils.data.DataLoader(Files(data.train, train_tf), shuffle=True, drop_last=True, batch_size=batch,
                                        num_workers=workers, pin_memory=pin)
    val = torch.utils.data.DataLoader(Files(data.val, val_tf), batch_size=batch, num_workers=workers, pin_memory=pin)
    opt = torch.optim.SGD(student.parameters(), lr=p["lr"], momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    temperature, alpha, seen, forwards = 5.0, 0.5, 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if teacher_epochs:  # the teacher's own fine-tuning, on its normalisation
        t_train = torch.utils.data.DataLoader(
            Files(data.train, T.Compose([*train_tf.transforms[:-1], T.Normalize(*mean_std(teacher))])), shuffle=True,
            drop_last=True, batch_size=batch, num_workers=workers, pin_memory=pin)
        t_opt = torch.optim.AdamW(teacher.parameters(), lr=p["teacher_lr"], weight_decay=0.05)
        teacher.train()
        for _ in range(teacher_epochs):
            for x, y in t_train:
                loss = F.cross_entropy(teacher(x.to(device)), y.to(device))
                t_opt.zero_grad()
                loss.backward()
                t_opt.step()
        teacher.eval()
    for _ in range(epochs):
        student.train()
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():  # the teacher gets its own normalisation, or it would teach badly
                t_logits = teacher((x * s_std + s_mean - t_mean) / t_std)
            forwards += len(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / temperature, 1), F.softmax(t_logits / temperature, 1),
                          reduction="batchmean") * temperature ** 2
            loss = alpha * kd + (1 - alpha) * F.cross_entropy(s_logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(x)
        sched.step()
        student.eval()
        preds, labels = [], []
        with torch.no_grad():
            for x, y in val:
                preds.append(student(x.to(device)).argmax(1).cpu())
                labels.append(y)
        bacc = balanced_accuracy_score(torch.cat(labels).numpy(), torch.cat(preds).numpy())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": seen, "teacher_forwards": forwards, "val_balanced_accuracy": float(bacc),
            "gpu_peak_gb": gpu_peak()}
