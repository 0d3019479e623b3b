"""Cross-section config rules that would otherwise stall a run: refused at load time, in one line."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_settings


@pytest.mark.parametrize(("k", "every"), [(0, 2), (1, 3), (2, 4)])
def test_publish_every_beyond_staleness_plus_one_is_refused_naming_both_fields(k: int, every: int):
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"pipeline.max_staleness": k, "learner.publish_every": every}, env={})
    msg = str(err.value)
    assert "\n" not in msg
    assert f"learner.publish_every={every} must be <= pipeline.max_staleness + 1 = {k + 1}" in msg
    assert "flag --" in msg or "[from" in msg


@pytest.mark.parametrize(("k", "every"), [(0, 1), (1, 2), (4, 5), (4, 1)])
def test_publish_every_up_to_staleness_plus_one_is_accepted(k: int, every: int):
    s = load_settings(None, {"pipeline.max_staleness": k, "learner.publish_every": every}, env={})
    assert (s.pipeline.max_staleness, s.learner.publish_every) == (k, every)
