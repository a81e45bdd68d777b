"""Job folders on shared storage: INFINITETALK_JOBS_DIR, and a name that depends on the job's content only
(so another server, with its own input path, finds the same folder and resumes)."""
from __future__ import annotations

import pytest

from infinitetalk.pipeline.request import GenerationRequest
from service_support import write_png, write_wav


def test_jobs_dir_setting(custom_node_package, tmp_path, monkeypatch):
    from infinitetalk_multi_pkg.nodes import bridge

    bridge.configure(temp_dir=tmp_path / "temp")
    monkeypatch.delenv(bridge.ENV_JOBS_DIR, raising=False)
    assert bridge.jobs_dir() == tmp_path / "temp" / "infinitetalk" / "jobs"   # today's place
    monkeypatch.setenv(bridge.ENV_JOBS_DIR, str(tmp_path / "shared" / "jobs"))
    assert bridge.jobs_dir() == tmp_path / "shared" / "jobs" and bridge.jobs_dir().is_dir()
    monkeypatch.setenv(bridge.ENV_JOBS_DIR, "relative/jobs")
    with pytest.raises(RuntimeError, match="INFINITETALK_JOBS_DIR='relative/jobs'.*absolute"):
        bridge.jobs_dir()


def test_the_job_folder_is_the_same_for_the_same_job_on_another_server(custom_node_package, tmp_path, monkeypatch):
    from infinitetalk_multi_pkg.nodes import bridge, sampler_nodes

    monkeypatch.setenv(bridge.ENV_JOBS_DIR, str(tmp_path / "jobs"))
    names = []
    for server in ("a", "b"):   # the same files under each server's own path
        folder = tmp_path / server / "input"
        folder.mkdir(parents=True)
        request = GenerationRequest(left_audio=write_wav(folder / "l.wav", 0.5), out=tmp_path / server / "out.mp4",
                                    right_audio=write_wav(folder / "r.wav", 0.3, freq=330),
                                    image=write_png(folder / "i.png"), seed=7)
        names.append(sampler_nodes._job_dir(request, object()))
    assert names[0] == names[1] and names[0].parent == tmp_path / "jobs"
    write_wav(tmp_path / "b" / "input" / "r.wav", 0.3, freq=440)   # other content: another job
    request.right_audio = tmp_path / "b" / "input" / "r.wav"
    assert sampler_nodes._job_dir(request, object()) != names[0]
