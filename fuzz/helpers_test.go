package fuzz

import (
	"net"
	"strconv"
)

func joinHostPort(h string, p uint16) string { return net.JoinHostPort(h, strconv.Itoa(int(p))) }
