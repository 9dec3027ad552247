from paddler_sync.cli import main

main()
