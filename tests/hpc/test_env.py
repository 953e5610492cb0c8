"""Launch-environment parsing: every launcher dialect -> one LaunchEnv, from plain dicts."""
import pytest

from hpc.env import LaunchEnv, detect, expand_nodelist, expand_tasks_per_node, export, in_slurm_step, slurm_port


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("localhost", ["localhost"]),
    ("node-1,node-2", ["node-1", "node-2"]),
    ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),  # padding follows the low end, like scontrol
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("a[1],b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("nid00[1-2]", ["nid001", "nid002"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[a-b]", "gpu[3-1]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


def slurm_step(**over):
    env = {"SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x4)",
           "SLURM_JOB_NODELIST": "gpu[01-03,07]", "SLURM_NODELIST": "gpu[01-03,07]"}
    env.update(over)
    return env


def test_slurm_step():
    env = detect(slurm_step())
    assert env == LaunchEnv("slurm", 5, 8, 1, 2, "gpu01", 20000 + 12345 % 20000)
    assert env.node_rank == 2


def test_slurm_port_is_shared_and_in_range():
    assert slurm_port(12345) == slurm_port("12345") == 32345
    assert all(20000 <= slurm_port(j) < 40000 for j in (0, 1, 19999, 20000, 10**9 + 7))
    assert detect(slurm_step(MASTER_PORT="4242")).master_port == 4242


def test_slurm_step_values_win_over_job_values():
    # srun -n 2 inside a 4-task allocation: the step's own task count and node list
    env = detect(slurm_step(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1,1", SLURM_NODEID="1",
                            SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_STEP_NODELIST="gpu[03,07]"))
    assert (env.world_size, env.local_world_size, env.master_addr) == (2, 1, "gpu03")


def test_uneven_tasks_per_node():
    env = detect(slurm_step(SLURM_TASKS_PER_NODE="3,1", SLURM_NTASKS="4", SLURM_NODEID="1",
                            SLURM_PROCID="3", SLURM_LOCALID="0"))
    assert env.local_world_size == 1


def test_batch_script_is_not_a_step():
    # the batch shell has SLURM_PROCID=0 and SLURM_NTASKS=8, but it is one process
    batch = slurm_step(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    del batch["SLURM_STEP_ID"]
    assert not in_slurm_step(batch)
    assert detect(batch).launcher == "single"
    assert detect({**batch, "SLURM_STEP_ID": "batch"}).world_size == 1


def test_openmpi():
    env = detect({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_NAMESPACE": "prterun-host-77@1"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("mpi", 3, 4, 1, 2)
    assert env.master_addr == ""  # multi-node mpirun: rank 0's hostname comes over MPI in hpc.dist
    same_job = detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "PMIX_NAMESPACE": "prterun-host-77@1"})
    assert same_job.master_port == env.master_port


def test_mpirun_inside_slurm_allocation_uses_first_node():
    # mpirun in the batch script: OMPI_* for ranks, SLURM_* inherited from the batch shell
    batch = slurm_step(SLURM_PROCID="0", SLURM_LOCALID="0")
    del batch["SLURM_STEP_ID"]
    env = detect({**batch, "OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8",
                  "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (env.launcher, env.rank, env.master_addr, env.master_port) == ("mpi", 6, "gpu01", 32345)


def test_single_node_mpirun_is_local():
    env = detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                  "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert env.master_addr == "127.0.0.1"


def test_mpich_hydra():
    env = detect({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("mpi", 2, 3, 2)


def test_torchrun_wins_over_everything():
    env = detect({**slurm_step(), "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                  "RANK": "7", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                  "MASTER_ADDR": "host0", "MASTER_PORT": "29511"})
    assert env == LaunchEnv("torchrun", 7, 16, 3, 8, "host0", 29511)


def test_single():
    env = detect({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == ("single", 0, 1, 0, "127.0.0.1")


def test_export_round_trips():
    out: dict[str, str] = {}
    env = detect(slurm_step())
    export(env, out)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu01", "MASTER_PORT": "32345"}
    again = detect({**slurm_step(), **out})
    assert (again.rank, again.world_size, again.local_rank, again.master_addr, again.master_port) == \
        (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port)


def test_inconsistent_environment_is_an_error():
    with pytest.raises(ValueError, match="inconsistent"):
        detect({"RANK": "4", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ValueError, match="not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})


def srun_pmi_task(rank: int, nodes: int, per_node: int, pmi: str) -> dict[str, str]:
    """One task of `srun -N nodes --ntasks-per-node=per_node --mpi=pmix|pmi2`, as slurmstepd sets it:
    the PMI variables carry only rank (and size); SLURM_* carry the node's share."""
    n = nodes * per_node
    env = {"SLURM_JOB_ID": "777", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(n),
           "SLURM_STEP_NUM_TASKS": str(n), "SLURM_NODEID": str(rank // per_node),
           "SLURM_LOCALID": str(rank % per_node), "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
           "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_STEP_NODELIST": f"n[1-{nodes}]",
           "SLURM_JOB_NODELIST": f"n[1-{nodes}]"}
    env.update({"PMIX_RANK": str(rank), "PMIX_NAMESPACE": "slurm.pmix.777.0"} if pmi == "pmix"
               else {"PMI_RANK": str(rank), "PMI_SIZE": str(n), "PMI_FD": "5"})
    return env


@pytest.mark.parametrize("pmi", ["pmix", "pmi2"])
@pytest.mark.parametrize("nodes, per_node", [(2, 4), (3, 2), (1, 4)])
def test_srun_with_pmi_knows_the_local_share(pmi, nodes, per_node):
    for rank in range(nodes * per_node):
        env = detect(srun_pmi_task(rank, nodes, per_node, pmi))
        assert (env.launcher, env.rank, env.world_size) == ("mpi", rank, nodes * per_node)
        assert (env.local_rank, env.local_world_size, env.node_rank) == (rank % per_node, per_node, rank // per_node)
        assert env.master_addr == "n1"


def test_srun_with_pmi_uneven_nodes():
    # srun -n 5 over 2 nodes: 3 + 2 tasks
    env = detect({**srun_pmi_task(4, 2, 3, "pmix"), "SLURM_STEP_NUM_TASKS": "5", "SLURM_NTASKS": "5",
                  "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_NODEID": "1", "SLURM_LOCALID": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (4, 5, 1, 2)
