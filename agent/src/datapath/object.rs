//! The embedded eBPF object: loading it with its maps pinned (adopting the maps of a previous
//! run), and typed access to those maps.

use std::{collections::BTreeSet, fs, io, net::Ipv4Addr, path::Path};

use aya::{
    maps::{Array, HashMap, MapData, MapError, MapType, PerCpuArray},
    programs::SchedClassifier,
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use nodeward_common::{
    counter, fastpath::SocketKey, maps, podaddr::PodAddressKey, EndpointKey, KernelConfig,
    ENDPOINT_FLAGS_NONE,
};

use super::{bpffs::Hook, Counters, DatapathError};

/// The eBPF object built by `build.rs` (`nodeward-ebpf`'s binary target of the same name).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeward-ebpf"));

/// Name of the protected-endpoints map: key [`EndpointKey`], value `u32` flags.
pub const PROTECTED_ENDPOINTS_MAP: &str = maps::PROTECTED_ENDPOINTS.name;
/// Name of the configuration map: index 0, value [`KernelConfig`].
pub const CONFIG_MAP: &str = maps::CONFIG.name;
/// Name of the per-CPU counters map: index [`nodeward_common::counter`], value `u64`.
pub const COUNTERS_MAP: &str = maps::COUNTERS.name;

/// What a pinned map must look like to be adopted: name and entries (from the shared table in
/// [`nodeward_common::maps`]), type, key size, value size.
struct MapSpec {
    map: maps::MapDef,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
}

/// The pinned maps of this build. A pinned map that differs (left by another version) is not
/// adopted: see [`retire_incompatible_pins`].
const MAP_SPECS: [MapSpec; 7] = [
    MapSpec {
        map: maps::POD_ADDRESSES,
        map_type: MapType::Hash,
        key_size: size_of::<PodAddressKey>() as u32,
        value_size: size_of::<u32>() as u32,
    },
    MapSpec {
        map: maps::PROTECTED_ENDPOINTS,
        map_type: MapType::Hash,
        key_size: size_of::<EndpointKey>() as u32,
        value_size: size_of::<u32>() as u32,
    },
    MapSpec {
        map: maps::CONFIG,
        map_type: MapType::Array,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<KernelConfig>() as u32,
    },
    MapSpec {
        map: maps::COUNTERS,
        map_type: MapType::PerCpuArray,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<u64>() as u32,
    },
    MapSpec {
        map: maps::FAST_PATH_SOCKETS,
        map_type: MapType::SockHash,
        key_size: size_of::<SocketKey>() as u32,
        value_size: size_of::<u32>() as u32,
    },
    MapSpec {
        map: maps::OPENED_FLOWS,
        map_type: MapType::LruHash,
        key_size: size_of::<SocketKey>() as u32,
        value_size: size_of::<u32>() as u32,
    },
    MapSpec {
        map: maps::NODE_NETNS,
        map_type: MapType::Array,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<u64>() as u32,
    },
];

// Every map of the shared table has a spec here.
const _: () = assert!(MAP_SPECS.len() == maps::ALL.len());

/// Protected endpoints carried over from a pinned map this build could not adopt.
pub type CarriedEndpoints = Vec<(Ipv4Addr, u16)>;

/// Removes pins of maps that this build's programs cannot use (another type or size, from
/// another version of nodeward), so that loading creates fresh ones. Programs still attached from
/// the previous run keep their own map until they are replaced. The protected endpoints of a
/// `PROTECTED_ENDPOINTS` map whose entries have the same layout are returned, to be written into
/// the new map before any new program is attached.
pub fn retire_incompatible_pins(maps_dir: &Path) -> Result<CarriedEndpoints, DatapathError> {
    let mut carried = Vec::new();
    for spec in &MAP_SPECS {
        let path = maps_dir.join(spec.map.name);
        if !path.exists() {
            continue;
        }
        let Ok(map) = MapData::from_pin(&path) else {
            // Not a map (or unreadable): the loader would fail on it the same way.
            remove_pin(&path)?;
            continue;
        };
        let info = map.info().map_err(|source| {
            DatapathError::map(spec.map.name, "reading the pinned map's info", source)
        })?;
        let compatible = info.map_type().ok() == Some(spec.map_type)
            && info.key_size() == spec.key_size
            && info.value_size() == spec.value_size
            && info.max_entries() == spec.map.max_entries;
        if compatible {
            continue;
        }
        tracing::warn!(
            map = spec.map.name,
            path = %path.display(),
            "the pinned map was made by another version of nodeward (type or size differ); \
             replacing it"
        );
        if spec.map.name == PROTECTED_ENDPOINTS_MAP
            && info.map_type().ok() == Some(MapType::Hash)
            && info.key_size() == spec.key_size
            && info.value_size() == spec.value_size
        {
            let map: HashMap<MapData, EndpointKey, u32> =
                HashMap::try_from(aya::maps::Map::HashMap(map))
                    .map_err(|source| DatapathError::map(spec.map.name, "open", source))?;
            for key in map.keys() {
                let key =
                    key.map_err(|source| DatapathError::map(spec.map.name, "iterate", source))?;
                carried.push((key.ip(), key.port()));
            }
        }
        remove_pin(&path)?;
    }
    Ok(carried)
}

fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    fs::remove_file(path).map_err(|source| DatapathError::PinDir {
        operation: "removing",
        path: path.to_owned(),
        source,
    })
}

/// Loads the object with its maps pinned in (or adopted from) `maps_dir`, and loads (verifies)
/// both TC programs without attaching them (the fast path's are loaded only when it is on).
pub fn load(maps_dir: &Path) -> Result<Ebpf, DatapathError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .load(OBJECT)
        .map_err(|source| DatapathError::Load {
            source: Box::new(source),
        })?;
    // The kernel side names its maps after the shared table; an object that lacks one was
    // built from another table.
    for map in &maps::ALL {
        if ebpf.map(map.name).is_none() {
            return Err(DatapathError::Missing {
                kind: "map",
                name: map.name,
            });
        }
    }
    for hook in [Hook::Steer, Hook::Guard, Hook::InPod, Hook::InPodEgress] {
        classifier(&mut ebpf, hook)?
            .load()
            .map_err(|source| DatapathError::Verify {
                name: hook.program(),
                source: Box::new(source),
            })?;
    }
    Ok(ebpf)
}

/// The TC classifier of `hook`.
pub fn classifier(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, DatapathError> {
    program(ebpf, hook.program())
}

/// The program `name` of the object, as its type `T` (a missing program, or one of another
/// type, is an error naming it).
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DatapathError::ProgramType {
            name,
            source: Box::new(source),
        })
}

/// Writes the single element of `CONFIG`.
pub fn write_config(ebpf: &mut Ebpf, config: KernelConfig) -> Result<(), DatapathError> {
    let map = ebpf.map_mut(CONFIG_MAP).ok_or(DatapathError::Missing {
        kind: "map",
        name: CONFIG_MAP,
    })?;
    let mut array: Array<&mut MapData, KernelConfig> =
        Array::try_from(map).map_err(|source| DatapathError::map(CONFIG_MAP, "open", source))?;
    array
        .set(0, config, 0)
        .map_err(|source| DatapathError::map(CONFIG_MAP, "write", source))
}

/// Reads the single element of `CONFIG`.
pub fn read_config(ebpf: &Ebpf) -> Result<KernelConfig, DatapathError> {
    let map = ebpf.map(CONFIG_MAP).ok_or(DatapathError::Missing {
        kind: "map",
        name: CONFIG_MAP,
    })?;
    let array: Array<&MapData, KernelConfig> =
        Array::try_from(map).map_err(|source| DatapathError::map(CONFIG_MAP, "open", source))?;
    array
        .get(&0, 0)
        .map_err(|source| DatapathError::map(CONFIG_MAP, "read", source))
}

/// The protected endpoints in the map, sorted.
pub fn protected_endpoints(ebpf: &Ebpf) -> Result<BTreeSet<(Ipv4Addr, u16)>, DatapathError> {
    let map = ebpf
        .map(PROTECTED_ENDPOINTS_MAP)
        .ok_or(DatapathError::Missing {
            kind: "map",
            name: PROTECTED_ENDPOINTS_MAP,
        })?;
    let map: HashMap<&MapData, EndpointKey, u32> = HashMap::try_from(map)
        .map_err(|source| DatapathError::map(PROTECTED_ENDPOINTS_MAP, "open", source))?;
    map.keys()
        .map(|key| {
            key.map(|key| (key.ip(), key.port()))
                .map_err(|source| DatapathError::map(PROTECTED_ENDPOINTS_MAP, "iterate", source))
        })
        .collect()
}

/// Inserts `add` and removes `remove` (address, port in host order) from the map.
pub fn update_endpoints(
    ebpf: &mut Ebpf,
    add: &[(Ipv4Addr, u16)],
    remove: &[(Ipv4Addr, u16)],
) -> Result<(), DatapathError> {
    let map = ebpf
        .map_mut(PROTECTED_ENDPOINTS_MAP)
        .ok_or(DatapathError::Missing {
            kind: "map",
            name: PROTECTED_ENDPOINTS_MAP,
        })?;
    let mut map: HashMap<&mut MapData, EndpointKey, u32> = HashMap::try_from(map)
        .map_err(|source| DatapathError::map(PROTECTED_ENDPOINTS_MAP, "open", source))?;
    for &(ip, port) in add {
        map.insert(EndpointKey::from_ipv4(ip, port), ENDPOINT_FLAGS_NONE, 0)
            .map_err(|source| DatapathError::map(PROTECTED_ENDPOINTS_MAP, "insert", source))?;
    }
    for &(ip, port) in remove {
        match map.remove(&EndpointKey::from_ipv4(ip, port)) {
            Ok(()) => {}
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::map(
                    PROTECTED_ENDPOINTS_MAP,
                    "remove",
                    source,
                ))
            }
        }
    }
    Ok(())
}

/// Reads the packet counters, summed over all CPUs.
pub fn read_counters(ebpf: &Ebpf) -> Result<Counters, DatapathError> {
    let map = ebpf.map(COUNTERS_MAP).ok_or(DatapathError::Missing {
        kind: "map",
        name: COUNTERS_MAP,
    })?;
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)
        .map_err(|source| DatapathError::map(COUNTERS_MAP, "open", source))?;
    let mut slots = [0_u64; counter::LEN as usize];
    for (slot, total) in (0..counter::LEN).zip(slots.iter_mut()) {
        let per_cpu = map
            .get(&slot, 0)
            .map_err(|source| DatapathError::map(COUNTERS_MAP, "read", source))?;
        *total = per_cpu.iter().copied().fold(0, u64::wrapping_add);
    }
    Ok(Counters::from_slots(&slots))
}

/// Name of the pod-address map (in-pod steering's anti-spoofing).
pub const POD_ADDRESSES_MAP: &str = maps::POD_ADDRESSES.name;

/// Makes `POD_ADDRESSES` hold exactly `wanted`.
pub fn sync_pod_addresses(
    ebpf: &mut Ebpf,
    wanted: &BTreeSet<(u64, std::net::IpAddr)>,
) -> Result<(), DatapathError> {
    let map = ebpf
        .map_mut(POD_ADDRESSES_MAP)
        .ok_or(DatapathError::Missing {
            kind: "map",
            name: POD_ADDRESSES_MAP,
        })?;
    let mut map: HashMap<&mut MapData, PodAddressKey, u32> = HashMap::try_from(map)
        .map_err(|source| DatapathError::map(POD_ADDRESSES_MAP, "open", source))?;
    let present: Vec<PodAddressKey> = map.keys().filter_map(Result::ok).collect();
    let wanted_keys: BTreeSet<(u64, [u8; 16])> = wanted
        .iter()
        .map(|&(cookie, ip)| {
            let key = PodAddressKey::new(cookie, ip);
            (key.netns_cookie, key.addr)
        })
        .collect();
    for key in &present {
        if !wanted_keys.contains(&(key.netns_cookie, key.addr)) {
            match map.remove(key) {
                Ok(()) => {}
                Err(MapError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::map(POD_ADDRESSES_MAP, "remove", source)),
            }
        }
    }
    for &(cookie, addr) in &wanted_keys {
        let key = PodAddressKey {
            netns_cookie: cookie,
            addr,
        };
        if !present.contains(&key) {
            map.insert(key, 0, 0)
                .map_err(|source| DatapathError::map(POD_ADDRESSES_MAP, "insert", source))?;
        }
    }
    Ok(())
}
