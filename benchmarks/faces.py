"""Benchmark: faces in ordinary pictures (--faces detect) on UTKFace crops pasted into 640x480 scenes.

Each scene holds one pasted UTKFace crop (random position, side 60-250 px,
tilt up to +-25 degrees), two crops (every 10th scene) or none (every 10th
scene); the paste transform is known, so the cut-out face can be compared with
the crop that was pasted. Scenes are saved as JPEG (quality 92), as photos are.

Reports:
  detection  recall over pasted faces, false positives per 100 scenes, ms per scene;
  alignment  the aligned crop's square against the original crop's: centre offset
             (share of the side), side ratio, angle (degrees); and the UTKFace
             framing refitted from the detected landmarks (--fit numbers for faces.py);
  agreement  the group a MobileNetV2 head predicts from the scene (largest face, cut
             out) against the group it predicts from the original crop (--head, one or
             more), with the crop used whole (aligned) and/or itself detected and re-cut in
             our framing (detect), as featurize --faces aligned|detect would see it
             (--crop-faces); optionally with predict's TTA on both sides (--tta: flip,
             and the zoomed cut-outs of faces cut out of a picture);
  speed      featurize images/s and process CPU seconds with --faces detect on the
             scenes against --faces aligned on the same faces' original crops.

    TORCH_HOME=../shared/torch python -m benchmarks.faces --head HEAD_DIR --scenes 150
    python -m benchmarks.faces --head HEAD_DIR --exclude train_files.txt   # crops the head never saw
    python -m benchmarks.faces --head A --head B --crop-faces aligned,detect --tta both --speed-backbones ""
    python -m benchmarks.faces --scenes 200 --speed-images 128 --speed-rounds 5    # featurize speed, medians

Prints Markdown tables with the machine and commit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if (SHARED / "torch").is_dir():
    os.environ.setdefault("TORCH_HOME", str(SHARED / "torch"))

import numpy as np
from PIL import Image

from benchmarks.machine_info import machine


@dataclass
class Scene:
    path: Path
    pasted: list = field(default_factory=list)   # [(crop file, crop->scene map)], largest first


def make_scenes(files: list[Path], count: int, seed: int, folder: Path) -> list[Scene]:
    """`count` scenes: every 10th without a face, every 10th (offset 5) with two, the rest with one."""
    from tests.support.scenes import background, paste

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    order = iter(rng.permutation(len(files)))
    scenes = []
    for index in range(count):
        kind = "none" if index % 10 == 9 else "two" if index % 10 == 4 else "one"
        picture = background(480, 640, seed * 100_000 + index)
        pasted = []
        slots = [(0, 640)] if kind == "one" else [(0, 320), (320, 640)] if kind == "two" else []
        for lo, hi in slots:
            crop_file = files[next(order)]
            side = rng.uniform(60, 250) if kind == "one" else rng.uniform(60, 200)
            tilt = rng.uniform(-25, 25)
            # Half the extent of the turned square, so it stays inside its slot and the picture.
            reach = side / 2 * (abs(math.cos(math.radians(tilt))) + abs(math.sin(math.radians(tilt)))) + 2
            reach = min(reach, (hi - lo) / 2 - 1, 239)
            centre = (rng.uniform(lo + reach, hi - reach), rng.uniform(reach, 480 - reach))
            crop = np.asarray(Image.open(crop_file).convert("RGB"))
            pasted.append((crop_file, paste(picture, crop, centre, side, tilt), side))
        pasted.sort(key=lambda p: -p[2])
        # Named after the largest face, so featurize reads its age from the name.
        name = (pasted[0][0].name.split(".jpg")[0] if pasted else f"30_0_0_2017000000000{index:04d}") + f"_s{index}.jpg"
        path = folder / name
        Image.fromarray(picture).save(path, quality=92)
        scenes.append(Scene(path, [(f, m) for f, m, _ in pasted]))
    return scenes


def in_crop(paste_map: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Scene coordinates [K, 2] -> the pasted crop's own coordinates (0..200)."""
    inverse = np.linalg.inv(np.vstack([paste_map, [0, 0, 1]]))[:2]
    return np.asarray(points, np.float64) @ inverse[:, :2].T + inverse[:, 2]


def matches(face, paste_map) -> bool:
    """A detection is this pasted face when its box centre lies in the crop's middle and its size is a face's.

    Measured in the pasted crop's own 200x200 frame; MTCNN boxes on UTKFace crops are 90-215 wide there
    (close-ups and babies fill the crop)."""
    centre = in_crop(paste_map, face.centre[None])[0]
    scale = math.hypot(paste_map[0, 0], paste_map[1, 0])
    width = (face.box[2] - face.box[0]) / scale
    return abs(centre[0] - 100) < 60 and abs(centre[1] - 100) < 70 and 40 < width < 280


def detection_and_alignment(scenes: list[Scene]) -> dict:
    import torch

    from pipeline.faces.crops import decode_rgb
    from pipeline.faces.detect import CROP_SIZE, align_face, make_face_mode
    from tests.support.scenes import crop_geometry

    detector = make_face_mode("detect")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the detector's own cost, without two threads spinning against each other
    found, total, false_positive, seconds, cpu_seconds = 0, 0, 0, [], []
    centre_error, side_ratio, angle_error, eye_mid, eye_span, box_fit, framing = [], [], [], [], [], [], []
    chosen = {}
    for scene in scenes:
        rgb = decode_rgb(np.fromfile(scene.path, dtype=np.uint8))
        start, cpu = time.perf_counter(), time.process_time()
        faces = detector.locate(rgb)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu)  # all threads; steadier than wall time on a shared machine
        used = set()
        for k, (crop_file, paste_map) in enumerate(scene.pasted):
            total += 1
            hit = next((i for i, face in enumerate(faces) if i not in used and matches(face, paste_map)), None)
            if hit is None:
                continue
            used.add(hit)
            found += 1
            face = faces[hit]
            aligned = align_face(rgb, face)
            framing.append(aligned.framing)
            to_original = np.linalg.inv(np.vstack([paste_map, [0, 0, 1]])) @ np.vstack([aligned.to_picture, [0, 0, 1]])
            centre, side, angle = crop_geometry(to_original[:2], CROP_SIZE)
            centre_error.append(np.linalg.norm(centre - CROP_SIZE / 2) / CROP_SIZE)
            side_ratio.append(side / CROP_SIZE)
            angle_error.append(abs(angle))
            eyes = in_crop(paste_map, face.landmarks[:2])
            eye_mid.append(eyes.mean(0) / CROP_SIZE)
            eye_span.append(np.linalg.norm(eyes[1] - eyes[0]) / CROP_SIZE)
            tilt = math.degrees(math.atan2(paste_map[1, 0], paste_map[0, 0]))
            if abs(tilt) < 8:  # the box is level only for a level face
                scale = math.hypot(paste_map[0, 0], paste_map[1, 0])
                box_centre = in_crop(paste_map, face.centre[None])[0]
                width, height = (face.box[2] - face.box[0]) / scale, (face.box[3] - face.box[1]) / scale
                box_fit.append(((100 - box_centre[0]) / width, (100 - box_centre[1]) / height, CROP_SIZE / height))
            if k == 0 and len(scene.pasted) == 1:
                chosen[scene.path] = (crop_file, (rgb, aligned), math.hypot(paste_map[0, 0], paste_map[1, 0]) * 200)
        false_positive += len(faces) - len(used)
    torch.set_num_threads(threads)
    eye_mid, box_fit = np.array(eye_mid), np.array(box_fit)
    return {
        "scenes": len(scenes), "faces": total, "found": found, "false_positives": false_positive,
        "ms_per_scene": 1000 * float(np.median(seconds)), "cpu_ms_per_scene": 1000 * float(np.median(cpu_seconds)),
        "centre": np.percentile(centre_error, [50, 95]),
        "side": np.percentile(np.abs(np.array(side_ratio) - 1), [50, 95]),
        "side_median": float(np.median(side_ratio)), "angle": np.percentile(angle_error, [50, 95]),
        "box_framed": framing.count("box"),
        "fit_eye_midpoint": np.median(eye_mid, 0), "fit_span_to_side": float(np.median(1 / np.array(eye_span))),
        "fit_box": np.median(box_fit, 0) if len(box_fit) else None, "fit_box_n": len(box_fit),
        "chosen": chosen,
    }


def crop_inputs(chosen: dict, crop_modes: tuple[str, ...]) -> dict:
    """Every picture the agreement numbers need, once for all heads: per one-face scene the face cut out of
    the scene, the original crop file as featurize --faces <mode> would see it for each of `crop_modes`
    (aligned: the file whole; detect: the file's own face found and re-cut in our framing, None when MTCNN
    finds none), the original mirrored, and the original re-cut 1:1 (pasted unscaled into a bigger
    picture, detected and aligned: only the framing differs from the original). Faces cut out of a
    picture are (picture, faces.AlignedFace) pairs, so TTA can cut them out again (predict's zooms)."""
    from pipeline.faces.detect import align_face, choose_face, make_face_mode
    from pipeline.images.views import load_rgb
    from tests.support.scenes import background

    detector = make_face_mode("detect")
    files, scene_crops, sides = [], [], []
    for crop_file, crop, side in chosen.values():
        files.append(crop_file)
        scene_crops.append(crop)
        sides.append(side)
    originals = [load_rgb(f) for f in files]
    by_mode = {}
    for mode in crop_modes:
        if mode == "aligned":
            by_mode[mode] = originals
        else:  # the file itself through the face mode, exactly as featurize's face decoder cuts it
            cut = []
            for original in originals:
                faces = detector.locate(original)
                cut.append((original, align_face(original, faces[choose_face(faces)])) if faces else None)
            by_mode[mode] = cut
    recut = []
    for original in originals:
        canvas = background(400, 400, 0)
        canvas[100:300, 100:300] = original
        faces = detector.locate(canvas)
        recut.append((canvas, align_face(canvas, faces[0])) if faces else original)
    truth_ages = [int(f.name.split("_")[0]) for f in files]
    return {"files": files, "sides": np.array(sides), "ages": np.array(truth_ages), "scene": scene_crops,
            "crop": by_mode, "mirror": [o[:, ::-1].copy() for o in originals], "recut": recut}


def head_groups(head: Path, inputs: dict, weights: dict, tta: bool) -> dict:
    """The group one head predicts for every picture of crop_inputs() (-1 where a picture is missing), as
    predict labels it: a crop file by its plain (and with TTA mirrored) view, a face cut out of a picture
    through predict's face_probabilities (with TTA also its zoomed cut-outs)."""
    import torch

    from pipeline.faces.crops import crops_to_views
    from pipeline.inference.predictor import Predictor, face_probabilities

    predictor = Predictor([head], weights, device="cpu")

    def groups(items: list) -> np.ndarray:
        out = np.full(len(items), -1)
        cut_out = [i for i, c in enumerate(items) if isinstance(c, tuple)]
        whole = [i for i, c in enumerate(items) if isinstance(c, np.ndarray)]
        for present in (cut_out, whole):
            for lo in range(0, len(present), 32):
                part = present[lo:lo + 32]
                batch = [items[i] for i in part]
                with torch.inference_mode():
                    if present is cut_out:
                        probs, _ = face_probabilities(predictor, batch, tta)
                    else:
                        probs, _ = predictor(crops_to_views(batch), tta=tta)
                out[part] = probs.argmax(1)
        return out

    edges = list(predictor.meta["group_edges"])
    return {"truth": np.array([next(i for i, edge in enumerate(edges) if age <= edge) for age in inputs["ages"]]),
            "scene": groups(inputs["scene"]), "crop": {m: groups(c) for m, c in inputs["crop"].items()},
            "mirror": groups(inputs["mirror"]), "recut": groups(inputs["recut"])}


def agreement(predicted: dict, sides: np.ndarray, within=(0, 1e9)) -> dict:
    """Agreement and accuracy of one head's groups over the one-face scenes whose pasted side lies in `within`."""
    pick = (sides >= within[0]) & (sides < within[1])
    scene, truth = predicted["scene"][pick], predicted["truth"][pick]

    def share(a, b):
        known = (a >= 0) & (b >= 0)
        return float((a[known] == b[known]).mean()) if known.any() else float("nan")

    result = {"n": int(pick.sum()), "accuracy_scene": share(scene, truth),
              "mirror": share(predicted["mirror"][pick], predicted["crop"]["aligned"][pick])
              if "aligned" in predicted["crop"] else float("nan"),
              "recut": share(predicted["recut"][pick], predicted["crop"]["aligned"][pick])
              if "aligned" in predicted["crop"] else float("nan")}
    for mode, crop in predicted["crop"].items():
        result[f"agreement_{mode}"] = share(scene, crop[pick])
        result[f"accuracy_crop_{mode}"] = share(crop[pick], truth)
        result[f"missing_{mode}"] = int((crop[pick] < 0).sum())
        result[f"recut_vs_{mode}"] = share(predicted["recut"][pick], crop[pick])
    return result


def featurize_speed(scenes: list[Scene], count: int, backbones: tuple[str, ...], folder: Path,
                    rounds: int = 1) -> dict:
    """--faces detect on `count` one-face scenes vs --faces aligned on their original crops: images/s and
    process CPU seconds, the median of `rounds` interleaved rounds (per round: the CPU ratio)."""
    from pipeline.features import extract

    picked = [s for s in scenes if len(s.pasted) == 1][:count]
    scene_dir, crop_dir = folder / "speed_scenes", folder / "speed_crops"
    scene_dir.mkdir(parents=True, exist_ok=True)
    crop_dir.mkdir(parents=True, exist_ok=True)
    for scene in picked:
        for folder_, target in ((scene_dir, scene.path), (crop_dir, scene.pasted[0][0])):
            link = folder_ / scene.path.name   # the same name in both, so the same labels and split
            if not link.exists():
                link.symlink_to(target.resolve())  # a relative --work would leave the link dangling
    runs = {"aligned": [], "detect": []}
    for _ in range(rounds):
        for mode, data in (("aligned", crop_dir), ("detect", scene_dir)):
            config = extract.FeaturizeConfig(data_dir=data, out=folder / f"speed_{mode}_{'_'.join(backbones)}.h5",
                                             backbones=backbones, weights={b: "IMAGENET1K_V1" for b in backbones},
                                             batch_size=32, device="cpu", decoder="torch", faces=mode)
            config.out.unlink(missing_ok=True)
            cpu, wall = time.process_time(), time.perf_counter()
            summary = extract.run(config, log=lambda *_: None)
            runs[mode].append({"images": summary["written"], "images_per_s": summary["images_per_s"],
                               "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall})
    results = {mode: {key: float(np.median([r[key] for r in done])) for key in done[0]} for mode, done in runs.items()}
    results["cpu_ratios"] = [d["cpu_s"] / a["cpu_s"] for a, d in zip(runs["aligned"], runs["detect"])]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "utkface")
    parser.add_argument("--scenes", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", type=Path, help="File names (one a line) not to paste, e.g. the head's data.")
    parser.add_argument("--head", type=Path, action="append", default=[],
                        help="MobileNetV2 head checkpoint for the agreement numbers (repeat for several).")
    parser.add_argument("--crop-faces", default="aligned,detect",
                        help="Face modes the original crop file goes through before the head, comma-separated: "
                             "aligned (the file whole), detect (its face found and re-cut, as featurize "
                             "--faces detect does). Each gets its own agreement column.")
    parser.add_argument("--tta", choices=("off", "on", "both"), default="off",
                        help="predict --tta on both sides: plain and mirror averaged, and faces cut out of a "
                             "picture also at faces.TTA_ZOOMS sides.")
    parser.add_argument("--head-weights", default="", help="NAME=FILE for a head made with local weights.")
    parser.add_argument("--speed-images", type=int, default=48, help="Scenes featurized for the speed numbers.")
    parser.add_argument("--speed-rounds", type=int, default=1,
                        help="Interleaved featurize runs per mode; the table shows the medians.")
    parser.add_argument("--speed-backbones", default="mobilenet_v2;mobilenet_v2,resnet50,efficientnet_b0",
                        help="Backbone sets timed, separated by ';'. Empty: skip the speed part.")
    parser.add_argument("--work", type=Path, help="Folder for the scenes (default: a temporary one).")
    args = parser.parse_args()

    import torch

    torch.manual_seed(args.seed)
    excluded = set(args.exclude.read_text().split()) if args.exclude else set()
    files = sorted(p for p in args.data.glob("*.jpg") if p.name not in excluded)
    if not files:
        sys.exit(f"no UTKFace crops in {args.data}")
    work = args.work or Path(tempfile.mkdtemp(prefix="faces-bench-"))
    scenes = make_scenes(files, args.scenes, args.seed, work / "scenes")
    detected = detection_and_alignment(scenes)

    info = machine()
    print(f"\n{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads, "
          f"commit {info['commit']}, {info['date']}, load {info['load']:.1f}\n")
    d = detected
    print(f"{d['scenes']} scenes 640x480 (JPEG q92), {d['faces']} pasted faces; "
          f"UTKFace crops from {args.data} (seed {args.seed})\n")
    print("| recall | false positives / 100 scenes | detector ms per scene, 1 thread (wall / CPU) | framed from box | "
          "centre error (median / p95, share of side) | side error (median / p95) | angle error deg (median / p95) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {d['found']}/{d['faces']} = {100 * d['found'] / d['faces']:.1f}% "
          f"| {100 * d['false_positives'] / d['scenes']:.2f} ({d['false_positives']}) "
          f"| {d['ms_per_scene']:.0f} / {d['cpu_ms_per_scene']:.0f} "
          f"| {d['box_framed']} | {d['centre'][0]:.3f} / {d['centre'][1]:.3f} "
          f"| {d['side'][0]:.3f} / {d['side'][1]:.3f} "
          f"| {d['angle'][0]:.1f} / {d['angle'][1]:.1f} |")
    print(f"\nFraming refitted from the detected landmarks (median over {d['found']} faces): eye midpoint at "
          f"({d['fit_eye_midpoint'][0]:.3f}, {d['fit_eye_midpoint'][1]:.3f}) of the crop, side = "
          f"{d['fit_span_to_side']:.3f} x eye distance; median side of our crop / original {d['side_median']:.3f}.")
    if d["fit_box"] is not None:
        shift_x, shift_y, to_side = d["fit_box"]
        print(f"Box framing on {d['fit_box_n']} level faces: crop centre = box centre + ({shift_x:.3f} w, "
              f"{shift_y:.3f} h), side = {to_side:.3f} x box height.")

    if args.head:
        from pipeline.cli.options import parse_weight_pairs

        weights = parse_weight_pairs(args.head_weights) if args.head_weights else {}
        modes = tuple(m.strip() for m in args.crop_faces.split(",") if m.strip())
        inputs = crop_inputs(d["chosen"], modes)
        missing = {m: sum(c is None for c in inputs["crop"][m]) for m in modes}
        print("\nOriginal crops through each --crop-faces mode: " + ", ".join(
            f"{m}: {len(inputs['files']) - missing[m]}/{len(inputs['files'])} with a face" for m in modes))
        header = ["head", "TTA", "pasted side (px)", "one-face scenes"]
        header += [f"agreement scene vs crop ({m})" for m in modes]
        header += ["accuracy from scene"] + [f"accuracy from crop ({m})" for m in modes]
        header += ["reference: crop vs its mirror", "reference: crop vs crop re-cut 1:1"]
        header += [f"reference: crop ({m}) vs re-cut 1:1" for m in modes if m != "aligned"]
        print("\n| " + " | ".join(header) + " |")
        print("|---|---|---|" + "---:|" * (len(header) - 3))
        for head in args.head:
            for tta in (False, True) if args.tta == "both" else (args.tta == "on",):
                predicted = head_groups(head, inputs, weights, tta)
                for label, sides in (("all (60-250)", (0, 1e9)), ("60-100", (0, 100)), ("100-160", (100, 160)),
                                     ("160-250", (160, 1e9))):
                    a = agreement(predicted, inputs["sides"], sides)
                    if not a["n"]:
                        continue
                    cells = [head.name, "flip + zoom" if tta else "-", label, str(a["n"])]
                    cells += [f"{100 * a[f'agreement_{m}']:.1f}%" for m in modes]
                    cells += [f"{100 * a['accuracy_scene']:.1f}%"] + [f"{100 * a[f'accuracy_crop_{m}']:.1f}%"
                                                                      for m in modes]
                    cells += [f"{100 * a['mirror']:.1f}%", f"{100 * a['recut']:.1f}%"]
                    cells += [f"{100 * a[f'recut_vs_{m}']:.1f}%" for m in modes if m != "aligned"]
                    print("| " + " | ".join(cells) + " |")

    sets = [tuple(s.split(",")) for s in args.speed_backbones.split(";") if s.strip()]
    if sets:
        print(f"\nfeaturize, median of {args.speed_rounds} interleaved round(s)\n")
        print("| backbones | images | aligned crops: img/s | CPU s | detect in scenes: img/s | CPU s "
              "| detection adds (CPU) | per round |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for backbones in sets:
            speed = featurize_speed(scenes, args.speed_images, backbones, work, args.speed_rounds)
            a, b = speed["aligned"], speed["detect"]
            per_round = ", ".join(f"{100 * (r - 1):+.0f}%" for r in speed["cpu_ratios"])
            print(f"| {'+'.join(backbones)} | {b['images']:.0f} | {a['images_per_s']:.1f} | {a['cpu_s']:.1f} "
                  f"| {b['images_per_s']:.1f} | {b['cpu_s']:.1f} | {100 * (b['cpu_s'] / a['cpu_s'] - 1):+.0f}% "
                  f"| {per_round} |")


if __name__ == "__main__":
    main()
