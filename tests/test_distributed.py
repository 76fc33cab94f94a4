"""The DDP rendezvous from the environment: SLURM's own nodelist expansion, the port, gloo's interface."""

from __future__ import annotations

import shutil
import socket

import pytest

from galaxygen import distributed
from galaxygen.distributed import DistributedError

needs_scontrol = pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) not installed")


@pytest.fixture
def slurm_conf(tmp_path, monkeypatch):
    """A minimal slurm.conf: `scontrol show hostnames` reads one but contacts no controller."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=nowhere\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))


@needs_scontrol
@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[03-05,07],cpu1", ["gpu03", "gpu04", "gpu05", "gpu07", "cpu1"]),
    ("rack[1-2]-node[01-04]", [f"rack{r}-node0{n}" for r in (1, 2) for n in range(1, 5)]),
    ("node-a1-ib,node-a2-ib", ["node-a1-ib", "node-a2-ib"]),
    ("n[001-003,010]", ["n001", "n002", "n003", "n010"]),
    ("login.cluster.example.org", ["login.cluster.example.org"]),
    ("node1", ["node1"]),
])
def test_nodelists_expand_as_slurm_expands_them(slurm_conf, nodelist, hosts):
    assert distributed.slurm_hostnames(nodelist) == hosts


@needs_scontrol
def test_a_suffix_after_a_range_is_expanded_or_refused_never_cut(slurm_conf):
    # SLURM 22.05 refuses 'node-a[1-2]-ib' (it writes such lists out in full); newer releases expand it.
    # The old hand-written parser answered 'node-a1'.
    try:
        hosts = distributed.slurm_hostnames("node-a[1-2]-ib")
    except DistributedError as err:
        assert "node-a[1-2]-ib" in str(err) and "Invalid hostlist" in str(err)
    else:
        assert hosts == ["node-a1-ib", "node-a2-ib"]


@needs_scontrol
def test_slurm_tasks_rendezvous_on_the_first_host_at_a_port_from_the_job_id(slurm_conf):
    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "rack[1-2]-node[01-04]"}
    assert distributed.read_env(env) == distributed.DistEnv(rank=5, world_size=8, local_rank=1)
    assert env["MASTER_ADDR"] == "rack1-node01"
    assert env["MASTER_PORT"] == str(15000 + 123456 % 20000)


def test_a_given_master_addr_wins_and_one_task_needs_no_rendezvous(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: it must not be needed
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[1-2]",
           "MASTER_ADDR": "10.0.0.5"}
    assert distributed.read_env(env).world_size == 2 and env["MASTER_ADDR"] == "10.0.0.5"
    single = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    assert distributed.read_env(single) == distributed.DistEnv() and "MASTER_ADDR" not in single


def test_missing_scontrol_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    with pytest.raises(DistributedError, match=r"cannot expand the SLURM nodelist 'gpu\[1-2\]': scontrol is not on PATH"):
        distributed.read_env(env)


def test_gloo_interface_is_left_alone_unless_the_host_name_is_loopback():
    given = {"MASTER_ADDR": "node1", "GLOO_SOCKET_IFNAME": "ib0"}
    assert distributed.pin_gloo_interface(given, hostname="localhost") is None and given["GLOO_SOCKET_IFNAME"] == "ib0"
    one_host = {"MASTER_ADDR": "127.0.0.1"}
    assert distributed.pin_gloo_interface(one_host, hostname="localhost") is None and "GLOO_SOCKET_IFNAME" not in one_host
    assert distributed.route_interface("127.0.0.1") == "lo"


@pytest.mark.slurm
def test_gloo_uses_the_interface_that_reaches_the_master_when_the_host_name_is_loopback():
    try:
        node1 = socket.gethostbyname("node1")
    except OSError:
        pytest.skip("node1 does not resolve: start the local cluster (sudo slurm/local-cluster.sh start)")
    # on this machine the local cluster's nodes sit behind the bridge galaxygen-br
    assert distributed.route_interface(node1) == "galaxygen-br"
    env = {"MASTER_ADDR": "node1"}
    assert distributed.pin_gloo_interface(env, hostname="localhost") == "galaxygen-br" == env["GLOO_SOCKET_IFNAME"]
    routable = {"MASTER_ADDR": "node1"}
    assert distributed.pin_gloo_interface(routable, hostname="node1") is None and "GLOO_SOCKET_IFNAME" not in routable
