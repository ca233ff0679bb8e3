import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgpipe.core.atomic import write_csv
from imgpipe.core.errors import DataError
from imgpipe.data.split import assign_roles, fold_plan
from imgpipe.stages.demo import digits_images


def digits_index(pairs_per_class=20):
    """The digits as a clean index; the first images of each class are paired into groups."""
    _, labels = digits_images()
    group = np.arange(len(labels))
    for label in range(10):
        rows = np.flatnonzero(labels == label)[: 2 * pairs_per_class]
        group[rows[1::2]] = rows[0::2]
    return pd.DataFrame(
        {
            "id": np.arange(len(labels)),
            "label": labels.astype(str),
            "group": group,
            "source": "train",
        }
    )


def with_roles(index, roles):
    assert list(roles.columns) == ["id", "role"]
    assert sorted(roles["id"]) == sorted(index["id"])
    assert set(roles["role"]) <= {"train", "val", "test"}
    return index.merge(roles, on="id")


def assert_groups_in_one_role(merged):
    roles_per_group = merged.groupby("group")["role"].nunique()
    assert roles_per_group.max() == 1, roles_per_group[roles_per_group > 1]


def test_split_is_stratified_by_class():
    index = digits_index()
    merged = with_roles(index, assign_roles(index, 0.2, 0.15, seed=0))
    shares = pd.crosstab(merged["label"], merged["role"], normalize="index")
    assert shares["test"].between(0.17, 0.23).all(), shares
    # val is drawn from the remaining 80%: about 0.15 * 0.8 of each class
    assert shares["val"].between(0.09, 0.15).all(), shares
    assert abs(merged["role"].eq("test").mean() - 0.2) < 0.01


def test_no_group_spans_two_roles():
    index = digits_index(pairs_per_class=60)
    # a few groups that mix labels (near duplicates under different labels)
    index.loc[index["id"].isin([5, 17, 900]), "group"] = 5
    merged = with_roles(index, assign_roles(index, 0.25, 0.2, seed=3))
    assert_groups_in_one_role(merged)


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    index = digits_index()
    write_csv(assign_roles(index, 0.2, 0.15, seed=7), tmp_path / "a.csv")
    write_csv(assign_roles(index, 0.2, 0.15, seed=7), tmp_path / "b.csv")
    write_csv(assign_roles(index, 0.2, 0.15, seed=8), tmp_path / "c.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "c.csv"]


def test_row_order_does_not_matter():
    index = digits_index()
    shuffled = index.sample(frac=1.0, random_state=1)
    a = assign_roles(index, 0.2, 0.15, seed=0)
    b = assign_roles(shuffled, 0.2, 0.15, seed=0)
    pd.testing.assert_frame_equal(a, b)


def test_test_root_rows_are_the_test_set():
    index = digits_index(pairs_per_class=0)
    is_test = index["id"] % 4 == 0
    index.loc[is_test, "source"] = "test"
    # a training image that near-duplicates a test image joins it in test
    index.loc[index["id"] == 1, "group"] = index.loc[index["id"] == 0, "group"].item()
    merged = with_roles(index, assign_roles(index, 0.2, 0.15, seed=0))
    tested = merged["role"] == "test"
    assert (tested == (is_test | (merged["id"] == 1))).all()
    assert_groups_in_one_role(merged)
    pool = merged[~tested]
    assert abs(pool["role"].eq("val").mean() - 0.15) < 0.02


def test_tiny_classes_stay_in_training():
    index = digits_index()
    extra = pd.DataFrame(
        {
            "id": [5000, 5001, 5002, 5003, 5004, 5005],
            "label": ["one", "two", "two", "onegroup", "onegroup", "onegroup"],
            "group": [5000, 5001, 5002, 5003, 5003, 5003],
            "source": "train",
        }
    )
    index = pd.concat([index, extra], ignore_index=True)
    for seed in range(5):
        merged = with_roles(index, assign_roles(index, 0.3, 0.3, seed=seed))
        roles = merged.groupby("label")["role"].apply(set)
        assert roles["one"] == {"train"}
        assert roles["onegroup"] == {"train"}
        assert "train" in roles["two"]
        assert_groups_in_one_role(merged)


def test_nothing_to_hold_out_is_a_data_error():
    index = pd.DataFrame({"id": [0, 1, 2], "label": ["a", "b", "c"], "group": [0, 1, 2]})
    with pytest.raises(DataError, match="two or more independent images"):
        assign_roles(index, 0.2, 0.15, seed=0)
    with pytest.raises(DataError, match="empty"):
        assign_roles(index.iloc[:0], 0.2, 0.15, seed=0)


@pytest.mark.parametrize(
    ("fraction", "groups", "largest", "plan"),
    [
        (0.2, 1000, 500, (1, 5)),
        (0.3, 1000, 500, (3, 10)),
        (0.15, 1000, 500, (1, 7)),
        (0.05, 1000, 500, (1, 20)),
        (0.4, 1000, 500, (2, 5)),
        (0.2, 3, 500, (1, 3)),  # capped by the number of groups
        (0.2, 1000, 2, (1, 2)),  # capped by the largest class
        (0.9, 2, 50, (1, 2)),
    ],
)
def test_fold_plan(fraction, groups, largest, plan):
    assert fold_plan(fraction, groups, largest) == plan


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    group_every=st.integers(1, 3),
    test_fraction=st.floats(0.05, 0.5),
    val_fraction=st.floats(0.05, 0.45),
    seed=st.integers(0, 2**16),
)
def test_any_small_index_splits_safely(sizes, group_every, test_fraction, val_fraction, seed):
    labels = np.repeat([f"c{i}" for i in range(len(sizes))], sizes)
    ids = np.arange(len(labels))
    index = pd.DataFrame({"id": ids, "label": labels, "group": ids // group_every})
    try:
        roles = assign_roles(index, test_fraction, val_fraction, seed)
    except DataError:
        return  # too few independent images is a clear stop, never a crash
    merged = with_roles(index, roles)
    assert_groups_in_one_role(merged)
    assert merged.loc[merged["role"] == "train", "label"].nunique() == len(sizes)
