import sys

from greyproxy.cli import main

main(["run", "bus", *sys.argv[1:]])
