"""Human names of the page: result keys, config keys, rejection reasons and settings, with units."""

from __future__ import annotations

# Result keys and table columns as a reader says them (units in the name).
LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "precision_macro": "Macro precision",
    "recall_macro": "Macro recall",
    "f1_macro": "Macro F1",
    "n_test": "Test images",
    "classes_tested": "Classes with test images",
    "hungarian_accuracy": "Hungarian accuracy",
    "purity": "Purity",
    "nmi": "NMI (normalised mutual information)",
    "ari": "ARI (adjusted Rand index)",
    "silhouette": "Silhouette",
    "inertia": "Inertia (sum of squared distances)",
    "n_samples": "Images scored",
    "n_clusters": "Clusters",
    "n_classes": "Classes",
    "n_features": "Feature dimensions",
    "method": "K-means method",
    "fit_seconds": "K-means time (s)",
    "scored_on": "Scored on",
    "class": "Class",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "support": "Test images",
    "trial": "Trial",
    "val_acc": "Validation accuracy",
    "val_loss": "Validation loss",
    "train_loss": "Training loss",
    "best_epoch": "Best epoch",
    "epochs": "Epochs trained",
    "seconds": "Time (s)",
    "fold": "Fold",
    "baseline_majority_accuracy": "Majority class: accuracy",
    "baseline_majority_balanced_accuracy": "Majority class: balanced accuracy",
    "baseline_majority_f1_macro": "Majority class: macro F1",
    "baseline_linear_accuracy": "Linear on pixels: accuracy",
    "baseline_linear_balanced_accuracy": "Linear on pixels: balanced accuracy",
    "baseline_linear_f1_macro": "Linear on pixels: macro F1",
    "id": "Image id",
    "path": "File",
    "relpath": "File",
    "label": "Label",
    "source": "Folder",
    "reason": "Reason",
    "detail": "Detail",
    "given_label": "Given label",
    "suggested_label": "Suggested label",
    "score": "Label quality (low = suspect)",
}
# Config keys (dotted) as a reader says them; others fall back to humanise().
CONFIG_LABELS = {
    "train.lr": "Learning rate",
    "train.weight_decay": "Weight decay",
    "train.batch_size": "Batch size",
    "train.momentum": "Momentum",
    "train.label_smoothing": "Label smoothing",
    "train.max_epochs": "Epochs (at most)",
    "train.optimizer": "Optimiser",
    "train.schedule": "Learning-rate schedule",
    "train.l1": "L1 penalty",
    "train.freeze": "Backbone freezing",
    "train.backbone_lr_mult": "Backbone learning-rate factor",
    "train.class_weights": "Class weights",
    "train.sampler": "Sampler",
    "train.early_stopping_patience": "Early-stopping patience (epochs)",
    "model.name": "Model",
    "model.dropout": "Dropout",
    "model.channels": "Channels",
    "model.weights": "Initial weights",
    "augment.rotation": "Rotation (degrees)",
    "augment.translate": "Shift (fraction of the side)",
    "augment.brightness": "Brightness jitter",
    "augment.contrast": "Contrast jitter",
}
# Rejection reasons (rejected.csv) as sentences' subjects.
REASONS = {
    "hidden": "Hidden file or folder",
    "no_class": "No class folder",
    "unsupported_extension": "Not an image file type",
    "missing_file": "Missing file",
    "outside_root": "Outside the data folder",
    "duplicate_row": "Listed twice in the manifest",
    "broken_symlink": "Broken symbolic link",
    "symlink_loop": "Symbolic link loop",
    "unreadable": "Unreadable",
    "zero_byte": "Empty file (0 bytes)",
    "not_image": "Not an image",
    "truncated": "Truncated file",
    "too_large": "Too many pixels (decompression bomb)",
    "exact_duplicate": "Exact duplicate",
    "near_duplicate": "Near duplicate",
    "label_conflict": "Same pixels under two labels",
    "low_information": "Blank or near-constant",
    "too_dark": "Too dark",
    "too_bright": "Too bright",
    "blurry": "Blurry",
    "too_small": "Too small",
    "odd_aspect": "Odd aspect ratio",
    "small_class": "Class with too few images",
    "test_leak": "Test image duplicating a training image",
}
CLEAN_SETTINGS = {
    "exact_duplicates": "Exact duplicates: keep one copy",
    "label_conflicts": "Same pixels under two labels: reject",
    "near_duplicates": "Near duplicates",
    "near_duplicate_distance": "Near duplicates: hash distance at most (bits of 64)",
    "near_duplicate_correlation": "Near duplicates: thumbnail correlation at least",
    "low_information": "Blank: grey-level standard deviation below",
    "dark": "Too dark: 99th brightness percentile below (0-255)",
    "bright": "Too bright: 1st brightness percentile above (0-255)",
    "blur": "Blurry: sharpness below",
    "min_side": "Too small: shorter side below (px)",
    "max_aspect": "Odd aspect ratio: long / short side above",
    "min_per_class": "Class too small: fewer images than",
}
NEAR_DUPLICATES = {
    "mode": "Handling",
    "components_above_one": "Linked sets of 2+ images (kept together in split and folds)",
    "images_in_components_above_one": "Images in linked sets of 2+",
    "max_component_size": "Largest linked set (images)",
    "groups_above_one": "Groups of 2+ images shown (each member linked to its leader)",
    "images_in_groups_above_one": "Images in groups of 2+",
    "max_group_size": "Largest group (images)",
    "groups": "Groups, single images included",
    "candidate_pairs": "Candidate pairs (perceptual hashes close)",
    "correlations_computed": "Pairs compared pixel by pixel",
}
ROLES = {
    "test": "Test images",
    "train": "Training images",
    "val": "Validation images",
    "all": "All images",
    "none": "Images without a role",
}
FEATURES = {"pixels": "Pixels", "embeddings": "Embeddings of the final model"}


def humanise(key: str) -> str:
    """A key as words: ``kept_per_class`` -> ``Kept per class``; ``train.foo_bar`` -> ``Foo bar (train)``."""
    section, _, name = str(key).rpartition(".")
    words = name.replace("_", " ").strip()
    words = words[:1].upper() + words[1:]
    return f"{words} ({section.replace('_', ' ')})" if section else words


def label(key: str) -> str:
    """The human name of a result key or column."""
    return LABELS.get(str(key)) or humanise(key)


def config_label(key: str) -> str:
    """The human name of a dotted config key (``train.lr`` -> ``Learning rate``)."""
    return CONFIG_LABELS.get(str(key)) or humanise(key)


def reason_label(reason: str) -> str:
    """The human name of a rejection reason."""
    return REASONS.get(str(reason)) or humanise(reason)
