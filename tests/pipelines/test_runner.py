"""Default runner flags shared by every job."""

import pytest

from pipelines.runner import with_default_runner


def test_defaults_to_one_in_process_worker():
    assert with_default_runner([]) == ["--runner=FnApiRunner"]
    # An explicit runner and worker flags are kept as given.
    args = ["--runner=DataflowRunner", "--project=p"]
    assert with_default_runner(args) == args
    mp = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    assert with_default_runner(mp) == mp + ["--runner=FnApiRunner"]


@pytest.mark.parametrize("args", [
    ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
    ["--direct_running_mode", "multi_threading", "--direct_num_workers", "4", "--runner=DirectRunner"],
    ["--direct_running_mode=multi_threading", "--direct_num_workers=0"],  # 0 = one per CPU in Beam.
])
def test_refuses_the_multi_threaded_local_runner(args):
    with pytest.raises(ValueError, match="multi_processing"):
        with_default_runner(args)


def test_single_threaded_multi_threading_mode_is_allowed():
    args = ["--direct_running_mode=multi_threading", "--direct_num_workers=1"]
    assert with_default_runner(args)[:2] == args
