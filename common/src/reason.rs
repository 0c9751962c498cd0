//! Reason codes: why the TC classifier `steer` returned the verdict it returned.
//!
//! Stable numbers: a code's meaning never changes, and a retired code stays reserved (listed here
//! as such) so that counters, logs and dashboards from older agents keep meaning what they meant.
//!
//! Today every code comes with the verdict `TC_ACT_OK` (pass). Steering protected traffic to the
//! enforcer arrives with the datapath work; it will add new codes rather than reuse these.

/// The packet is IPv4/TCP but its destination (address, port) is not in `PROTECTED_ENDPOINTS`:
/// nodeward does not enforce anything for it and passes it untouched.
pub const PASS_NOT_PROTECTED: u32 = 0;

/// The packet is not something the classifier judges (not IPv4, not TCP, or a non-first IP
/// fragment, which carries no TCP header): passed untouched.
pub const PASS_NOT_IPV4_TCP: u32 = 1;

/// The destination is in `PROTECTED_ENDPOINTS`, but this build of the classifier does not steer
/// yet: the packet is passed untouched, and counted so the operator can see protected traffic that
/// is not enforced. Retired (kept reserved) once steering exists.
pub const PASS_PROTECTED_NOT_STEERED: u32 = 2;

/// The packet's headers could not be read (a frame or IPv4/TCP header cut short, an IPv4 header
/// length below 20 bytes): the classifier cannot judge it and passes it with its documented
/// default verdict. Malformed packets are for the kernel's stack to drop; nodeward counts them.
pub const PASS_MALFORMED: u32 = 3;

/// One past the highest code in use.
pub const COUNT: u32 = 4;
