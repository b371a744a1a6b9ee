"""How the trainer finds its rank: torchrun / deepspeed variables, SLURM's, or none."""

from megatron_slung.training.distributed import environment_from_launcher, expand_nodelist


def test_expand_slurm_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[9-11]") == ["a9", "a10", "a11"]


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert environment_from_launcher(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                              "MASTER_ADDR": "h", "MASTER_PORT": "1234"}


def test_slurm_srun_without_torchrun():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[04-05]",
           "SLURM_JOB_ID": "123456"}
    out = environment_from_launcher(env)
    assert out == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu04",
                   "MASTER_PORT": str(10000 + 123456 % 50000)}
    env["MASTER_ADDR"], env["MASTER_PORT"] = "10.0.0.1", "29500"
    assert environment_from_launcher(env)["MASTER_ADDR"] == "10.0.0.1"


def test_no_launcher_is_one_process():
    out = environment_from_launcher({})
    assert out["RANK"] == "0" and out["WORLD_SIZE"] == "1" and out["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(out["MASTER_PORT"]) < 65536
