"""The QMIX/Centr-LB coordinator and its protocol (training on the live testbed)."""
