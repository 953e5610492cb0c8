# Sourced by .ci/slurm.sh and .ci/slurm-2node.sh: the slurm.conf lines both test clusters share
# (scheduling, no accounting, quick requeue). $1: KillWait, seconds from SIGTERM to SIGKILL.
slurm_common_conf() {
    cat <<CONF
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=$1
MinJobAge=300
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
CONF
}
