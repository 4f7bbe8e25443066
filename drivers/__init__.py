"""Machine drivers: Modbus TCP/RTU and OPC UA, their tag model and simulators."""
