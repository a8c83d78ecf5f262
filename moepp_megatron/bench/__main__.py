from moepp_megatron.bench.cli import main

main()
