// Package proto defines every datagram overlayd peers exchange on their one
// UDP port (default 6783), with encoders and decoders that never panic on
// untrusted input, never allocate more than the input they are given, and
// return an error for anything malformed.
//
// The package is pure: it has no sockets, clocks, goroutines or globals.
//
// # Byte order and sizes
//
// All integers are big-endian. A peer name is 6 bytes (48 bits). A UID is 8
// bytes. An IPv4 prefix is 5 bytes: 4 address bytes, then the prefix length;
// a length of 255 with address 0.0.0.0 means "no prefix" (IPAM disabled).
// A short string is one length byte followed by that many bytes.
//
// # Header (4 bytes, every datagram)
//
//	 0       1       2       3
//	+-------+-------+-------+-------+
//	|version| type  | flags |  0    |
//	+-------+-------+-------+-------+
//
// version is the wire version of this datagram. Version 1 is the only one
// defined; the handshake negotiates the version a connection uses from each
// side's [min, max] range (see Hello). Datagrams of any other version are
// rejected. type is one of:
//
//	1 hello      handshake request
//	2 accept     handshake answer
//	3 reject     handshake refusal
//	4 heartbeat  liveness probe on an accepted connection
//	5 gossip     control-plane state for a named channel
//	6 data       one IP packet
//	7 init       password mode: handshake request
//	8 cookie     password mode: proof-of-address token for the dialler
//	9 response   password mode: handshake answer
//	10 finish    password mode: handshake conclusion
//	11 sealed    password mode: an encrypted heartbeat or gossip message
//
// flags are per type (heartbeat and gossip define one each); undefined bits
// must be sent as zero and are ignored on receipt. Byte 3 counts the relays
// a gossip or data message has crossed (hops); other types send zero, and it
// is ignored on receipt.
//
// # Hello and accept (types 1 and 2)
//
//	offset size
//	 0      4   header
//	 4      1   min protocol version the sender speaks
//	 5      1   max protocol version the sender speaks
//	 6      6   sender peer name
//	12      8   sender UID (random per process start, never zero)
//	20      2   sender's UDP port
//	22      5   sender's IPAM range (IPv4 prefix; none = 255 length)
//	27      1   nickname length n (at most 64)
//	28      n   nickname (UTF-8)
//	28+n    2   optional: the sender's WireGuard data port (password
//	            mode); absent or zero: none
//	30+n   32   optional: the sender's Ed25519 public key, which signs
//	            its topology entries (password mode); absent: none
//	62+n    1   optional (the fields before it are then present, zero
//	            or not): flags; bit 0 (0x01): the sender trusts the
//	            receiver's underlay address (it is in the sender's
//	            --trusted-subnets), so data may go in clear if the
//	            receiver trusts the sender's too (password mode); other
//	            bits are ignored; absent: 0
//	63+n    8   optional (the fields before it are then present): in an
//	            accept in plaintext mode, the proof, which the dialler
//	            sends back in its heartbeats; absent: 0
//
// A hello is padded with zeros to 288 bytes (HelloMinLen); in plaintext
// mode a hello shorter than that is not answered, so that no accept or
// reject is larger than the hello it answers.
//
// A peer dials by sending hello; the other side validates it and answers
// accept (same layout, its own identity) or reject. On a hello, flags bit 0
// (0x01) says the dialler was configured to dial us (not discovery): under
// the connection limit such peers may take the last tenth of the places. Trailing bytes after the
// optional fields are ignored, so later versions may append more.
//
// # Reject (type 3)
//
//	offset size
//	 0      4   header
//	 4      1   reason code (1 range, 2 name collision, 3 version, 4 other;
//	            password mode: 5 the dialler needs a password, 6 the
//	            refusing peer has none, 7 the passwords differ)
//	 5      6   rejecting peer's name
//	11      5   rejecting peer's IPAM range
//	16      1   message length n
//	17      n   human-readable message (UTF-8)
//
// A reject only ever answers a hello or an init; nobody answers a reject.
// Rejects with codes 5 to 7 carry a zero name, no range and no message: a
// peer without the password learns nothing from them.
//
// # Heartbeat (type 4)
//
//	offset size
//	 0      4   header; flags bit 0 (0x01) = the sender considers the
//	            connection established
//	 4      6   sender peer name
//	10      8   sender UID
//	18      8   optional: the proof of the accept the sender received
//	            (plaintext mode); absent: 0
//
// Sent every 400 ms on every accepted connection. In plaintext mode a
// peer that accepted a hello counts the connection established, and takes
// gossip over it, only once a heartbeat brings back the proof it put in
// its accept: a hello from a forged source address opens nothing that
// answers to that address more than a hello's worth. A connection that has heard
// nothing from its peer for 2 s is dead.
//
// # Gossip (type 5)
//
//	offset size
//	 0      4   header; flags bit 0 (0x01) = chunk header present;
//	            byte 3 = relays crossed
//	 4      1   channel name length n (1..32)
//	 5      n   channel name (e.g. "topology")
//	 5+n    6   origin peer name
//	11+n    6   destination peer name (00:00:00:00:00:00 = every peer)
//	17+n    8   only with flag 0x01: message id (4), chunk index (2),
//	            chunk count (2, at least 2, index < count)
//	 *      *   payload, owned by the channel (at most MaxGossipPayload bytes)
//
// A message too big for one datagram is cut into chunks of at most 1200
// payload bytes, all with the same message id; the receiver puts them back
// together (peering/gossip, with limits on size, count and age).
//
// # Data (type 6)
//
//	offset size
//	 0      4   header; byte 3 = relays crossed
//	 4      6   source peer (the one that read the packet from its TUN)
//	10      6   destination peer (the one that writes it to its TUN)
//	16      *   one IPv4 or IPv6 packet
//
// DataHeaderLen (16) is the whole per-packet overhead, so the overlay MTU is
// the underlay MTU minus 20 (IPv4) + 8 (UDP) + 16 = 44 bytes: 1456 on a 1500
// byte underlay.
//
// # Password mode (types 7 to 11)
//
// With a password every peer runs a Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s
// handshake (prologue "overlayd handshake v1"; the pre-shared key is
// Argon2id(password, salt "overlayd mesh password v1", t=3, m=64 MiB, p=4))
// instead of hello and accept, then seals every heartbeat and gossip
// message. Hello, accept, heartbeat and gossip in the clear are refused.
//
//	init (7)     header (flags bit 0 = configured, as on a hello) |
//	             cookie (16; zero on the first attempt) | Noise message 1,
//	             whose payload is the dialler's hello (type 1, whole)
//	cookie (8)   header | cookie (16): the answer to an init whose cookie
//	             is not HMAC-SHA256(secret, the dialler's address as 16
//	             bytes | port 2)[:16] under the current or the previous
//	             secret (one rotates every 2 minutes)
//	response (9) header | Noise message 2, whose payload is the
//	             responder's accept (type 2, whole)
//	finish (10)  header | Noise message 3 (empty payload)
//	sealed (11)  header | counter (8) | ChaCha20-Poly1305 of the inner
//	             message (a heartbeat or gossip, whole) with the key of
//	             the sender's direction, nonce 4 zero bytes | counter
//	             little-endian, and the first 12 bytes as additional data
//
// Handshake bytes are at most 512. Counters start at 0 and rise by one per
// message; the receiver keeps a window of 8,128 (WireGuard's) and drops a
// message it has seen or that is older, after the tag checks.
//
// # Channel "topology"
//
// The first payload byte is the kind:
//
//	1 hash     count of entries (4) | XOR of the entries' hashes (8)
//	2 digest request, 3 digest reply
//	           n (2) | n × (peer name 6 | UID 8 | version 8)
//	4 entries  n (2) | n × entry
//	5 signed entries (password mode; kind 4 is refused there)
//	           n (2) | n × (entry | Ed25519 public key 32 | signature 64),
//	           where each connection of the entry is followed by the
//	           signing key (32) that neighbour proved in its handshake;
//	           the signature is over "overlayd topology entry v1" | 0x00 |
//	           the entry (so encoded) | the key
//
// An entry:
//
//	6  peer name        8  UID            8  version
//	2  UDP port         1+k nickname (k <= 64)
//	2  connections c, then c × (peer name 6 | remote address as 16-byte
//	   IPv6, IPv4 mapped | port 2 | flags 1: 0x01 outbound, 0x02 established),
//	   sorted by peer name, distinct, never the entry's own name
//	2  prefixes p, then p × IPv4 prefix (5)
//
// # Channel "ipam"
//
// The allocator's messages, unicast to one peer (a broadcast is one
// unicast per reachable peer). Addresses are IPv4 addresses as big-endian
// 32-bit integers. The first payload byte is the kind:
//
//	1 ring          flags (1): 0x01 reply (answer with your ring if it holds
//	                what this one lacks), 0x02 partial (only changed
//	                entries) | range (5) | seeds n (2) | n × peer name |
//	                entries k (4) | k × (token 4 | owner 6 | version 4 | free 4)
//	2 paxos         voters n (2) | n × (name 6 | UID 8 | promise | accepted |
//	                origin | value m (2) | m × name), each proposal being
//	                round (4) | proposer name (6) | proposer UID (8)
//	3 ring request  nothing: an observer (or a peer without a ring) asks
//	4 space request first (4) | last (4): give me free space in there
//	5 space denied  first (4) | last (4): nothing free there
//	6 digest        ring hash (8) | echo (1): if your ring hashes otherwise,
//	                send it (flag reply); with echo, answer an equal hash too
//	7 hold check    first (4) | last (4) | hash of who owns that span (8):
//	                answer 8 if yours is the same (space taken over by
//	                rmpeer is used once every reachable peer agrees)
//	8 hold ack      first (4) | last (4) | hash (8): it is the same
//
// A whole ring's tokens are ascending, the first at the start of the range,
// owners non-zero, versions at most 2^31. In a partial ring an entry with
// owner 0 is a bound: a token the receiver must hold already, where the
// range of the entry before it ends.
//
// # Channel "nameserver"
//
// The name store's messages (WeaveDNS), unicast to one peer (a broadcast
// is one unicast per reachable peer). The first payload byte is the kind:
//
//	1 entries  n (2) | n × entry, n <= 4096
//	2 digest   echo (1) | n (2) | n × (origin 6 | hash of its entries 8),
//	           origins ascending; the receiver sends back its entries of
//	           every origin whose hash differs and, with echo, its own
//	           digest if anything differs
//	3 summary  hash of all the sender's origin hashes (8): a receiver
//	           whose own differs answers with its digest (echo)
//
// An entry:
//
//	1+k hostname (FQDN with its trailing dot, 1 <= k <= 254)
//	4   IPv4 address
//	1+k container ID (k <= 255)
//	6   origin peer    4  version (<= 2^31)
//	1   flags: 0x01 tombstone
//	4   age of the tombstone in milliseconds (<= 86,400,000; 0 on a live
//	    entry): a duration, so that no two clocks are compared
//
// Golden vectors for every message live in testdata/golden.txt and are
// checked by TestGolden.
package proto
