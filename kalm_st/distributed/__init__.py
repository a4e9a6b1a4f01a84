"""Training across processes beyond DDP: FSDP2 sharding (:mod:`~kalm_st.distributed.sharding`,
:mod:`~kalm_st.distributed.sharded_trainer`)."""
