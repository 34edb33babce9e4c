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


def test_resolve_pipeline_options_defaults_flags_and_options_alike():
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    from pipelines.runner import FlagError, resolve_pipeline_options
    assert resolve_pipeline_options(None).view_as(StandardOptions).runner == "FnApiRunner"
    assert resolve_pipeline_options(["--runner=DataflowRunner"]).view_as(StandardOptions).runner == "DataflowRunner"
    given = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    resolved = resolve_pipeline_options(given)
    assert resolved.view_as(StandardOptions).runner == "FnApiRunner"
    assert resolved.view_as(DirectOptions).direct_num_workers == 2
    kept = resolve_pipeline_options(PipelineOptions(["--runner=DirectRunner"]))
    assert kept.view_as(StandardOptions).runner == "DirectRunner"
    for unsafe in (["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
                   PipelineOptions(["--direct_running_mode=multi_threading", "--direct_num_workers=2"])):
        with pytest.raises(FlagError, match="multi_processing"):
            resolve_pipeline_options(unsafe)
    with pytest.raises(TypeError, match="list of Beam flags"):
        resolve_pipeline_options("--runner=FnApiRunner")
