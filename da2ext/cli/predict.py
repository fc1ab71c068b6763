"""python -m da2ext predict: a learned domain's top-k classes for image files.

    python -m da2ext predict --workdir runs --domain mnist digit.png more_digits/
    python -m da2ext predict --workdir runs --domain mnist --json --topk 3 photos/ > predictions.json

Directories are walked (sub-folders included, each real folder once); an image
that cannot be read is named on stderr and left out, and the exit status is
then 1 (0 when every image was classified, 2 when none could be). Images are
prepared as the domain's file records (image size, normalisation) and run in
batches, with a progress bar on stderr.
"""
import json
import os
import sys

__all__ = ["IMAGE_EXTENSIONS", "collect_images", "format_table", "predict_files", "write_results"]

# What a directory walk takes as an image (the formats Pillow reads that torchvision's ImageFolder takes).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _is_image(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def collect_images(arguments):
    """(image paths, problems): files as given, directories walked for images;
    a path that does not exist, or a directory without images, is a problem."""
    from ..data.loaders import image_files
    paths, problems = [], []
    for argument in arguments:
        if os.path.isdir(argument):
            found = image_files(argument, _is_image)
            if not found:
                problems.append("{}: no images ({}) in this directory".format(argument, ", ".join(IMAGE_EXTENSIONS)))
            paths.extend(found)
        elif os.path.isfile(argument):
            paths.append(argument)
        else:
            problems.append("{}: no such file or directory".format(argument))
    return paths, problems


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="image", desc="predict", file=sys.stderr, leave=False)


def predict_files(model, domain, paths, topk=5, batch_size=64, progress=True):
    """([(path, predictions)], [(path, message)] of the images that could not be
    read): model.predict over the images at `paths`, read a batch at a time."""
    from ..data.loaders import DataError, load_rgb
    results, unreadable = [], []
    bar = _progress(len(paths), progress)
    try:
        for start in range(0, len(paths), batch_size):
            images, names = [], []
            for path in paths[start:start + batch_size]:
                try:
                    images.append(load_rgb(path))
                    names.append(path)
                except DataError as error:
                    unreadable.append((path, str(error)))
            if images:
                results.extend(zip(names, model.predict(images, domain=domain, topk=topk, batch_size=batch_size)))
            if bar is not None:
                bar.update(min(batch_size, len(paths) - start))
    finally:
        if bar is not None:
            bar.close()
    return results, unreadable


def format_table(results):
    """A markdown table: the image, then its top classes with their probabilities."""
    columns = max([len(predictions) for _, predictions in results] + [1])
    header = ["image"] + ["top {}".format(i + 1) if columns > 1 else "class" for i in range(columns)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    for path, predictions in results:
        cells = ["{} ({:.1f} %)".format(p["class"], 100.0 * p["probability"]) for p in predictions]
        lines.append("| " + " | ".join([path] + cells + [""] * (columns - len(cells))) + " |")
    return "\n".join(lines)


def write_results(results, as_json, stream=None):
    """The predictions as a table, or as JSON: [{"image", "predictions": [{"class", "index", "probability"}]}]."""
    stream = stream or sys.stdout
    if as_json:
        json.dump([{"image": path, "predictions": predictions} for path, predictions in results], stream, indent=1)
        stream.write("\n")
    else:
        stream.write(format_table(results) + "\n")
