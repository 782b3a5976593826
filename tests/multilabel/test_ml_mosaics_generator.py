"""The embedding-mosaic generator of benchmarks/unidec_mosaics.py (also used by benchmarks/csa_text.py)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import SHARED_DATA


@pytest.mark.skipif(not (SHARED_DATA / "clip_vitb32" / "text").is_dir(), reason="needs ../shared/data/clip_vitb32")
def test_text_mosaics_carry_the_class_text_and_2_to_4_labels():
    from benchmarks.csa_text import SOURCES
    from benchmarks.unidec_mosaics import make_mosaics

    a = make_mosaics(SHARED_DATA, 200, 80, 0.2, 0, SOURCES, "clip_vitb32/text")
    C = a["Y"].shape[1]
    assert C == 102 and a["text"].shape == (C, 512) and len(a["classes"]) == C
    k = a["Y"].sum(1)
    assert k.min() >= 2 and k.max() <= 4
    np.testing.assert_allclose(np.linalg.norm(a["X"], axis=1), 1.0, rtol=1e-5)
    train = a["split"] == "train"
    assert not a["labeled"][~train].any() and (a["Y"][a["labeled"]].sum(0) > 0).all()
    # the same seed gives the same file
    b = make_mosaics(SHARED_DATA, 200, 80, 0.2, 0, SOURCES, "clip_vitb32/text")
    np.testing.assert_array_equal(a["Y"], b["Y"])
